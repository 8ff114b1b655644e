"""stages: each customer's recorded lifecycle stage, and the history of its changes

The customer row carries the stage the last evaluation recorded (with since when and the
stage before it), so the facts of a batch come from the same one query; every change is
a row of stage_transitions (from, to, when, rules version) for the transition matrix.

Revision ID: 0007_stages
Revises: 0006_dispatch_lease
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0007_stages"
down_revision = "0006_dispatch_lease"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("stage", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(
            sa.Column("stage_since", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("previous_stage", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
    op.create_table(
        "stage_transitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("customer_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("from_stage", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("to_stage", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("rules_version", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_stage_transitions_at", "stage_transitions", ["at"])
    op.create_index("ix_stage_transitions_customer_at", "stage_transitions", ["customer_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_stage_transitions_customer_at", table_name="stage_transitions")
    op.drop_index("ix_stage_transitions_at", table_name="stage_transitions")
    op.drop_table("stage_transitions")
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.drop_column("previous_stage")
        batch_op.drop_column("stage_since")
        batch_op.drop_column("stage")
