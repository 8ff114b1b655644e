"""journey core: steps by id, versioned enrollments, pending events by customer, the
journey graph (arms, waits for events, last touches, conversions)

Revision ID: 0002_journey_core
Revises: 0001
Create Date: 2026-12-01

An active enrollment of 0001 knew its next step by position; the planner now knows it by
id. Positions become "#<n>" markers that the planner resolves once, against the rules in
force, to the n-th step's id (or ends the journey if the playbook no longer has one).
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0002_journey_core"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("step_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("queued_count", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("arm", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(
            sa.Column("waiting_since", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("last_touch_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("last_touch_step", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(
            sa.Column("converted_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column(
                "conversion_event_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True
            )
        )
        batch_op.add_column(
            sa.Column("conversion_step", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.create_index("ix_enrollments_playbook_arm", ["playbook", "arm"], unique=False)
    op.execute(
        "UPDATE enrollments SET step_id = '#' || CAST(next_step AS VARCHAR) WHERE status = 'active'"
    )
    op.execute(
        "UPDATE enrollments SET queued_count = "
        "(SELECT count(*) FROM messages WHERE messages.enrollment_id = enrollments.id)"
    )
    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.drop_column("next_step")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_evaluated_at")
        batch_op.create_index(
            "ix_events_pending",
            ["customer_id", "occurred_at"],
            unique=False,
            sqlite_where=sa.text("evaluated_at IS NULL"),
            postgresql_where=sa.text("evaluated_at IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_pending")
        batch_op.create_index("ix_events_evaluated_at", ["evaluated_at"], unique=False)
    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("next_step", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.drop_index("ix_enrollments_playbook_arm")
        for name in (
            "conversion_step",
            "conversion_event_id",
            "converted_at",
            "last_touch_step",
            "last_touch_at",
            "waiting_since",
            "arm",
        ):
            batch_op.drop_column(name)
        batch_op.drop_column("queued_count")
        batch_op.drop_column("version")
        batch_op.drop_column("step_id")
