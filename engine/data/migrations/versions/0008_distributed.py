"""distributed: ticks and their tasks (the task-run key that gates the watermark), and the
workers seen

A tick planned by the scheduler of the distributed runner is a row of ``ticks``; each of
its tasks (an evaluation shard, a dispatch batch, an SLA check) a row of ``tick_tasks``
keyed by (tick, number). A task marks its row done with a guarded update, and the one
that finishes last completes the tick and, for an incremental evaluation, moves the
watermark. ``workers_seen`` holds each `lifecycle worker`'s heartbeat.

Revision ID: 0008_distributed
Revises: 0007_stages
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0008_distributed"
down_revision = "0007_stages"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ticks",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("now", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("rules_version", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("tasks", sa.Integer(), nullable=False),
        sa.Column("watermark", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("planned_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("completed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ticks", schema=None) as batch_op:
        batch_op.create_index("ix_ticks_kind_completed", ["kind", "completed_at"], unique=False)
    op.create_table(
        "tick_tasks",
        sa.Column("tick_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("enqueued_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("done_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("worker", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["tick_id"], ["ticks.id"]),
        sa.PrimaryKeyConstraint("tick_id", "number"),
    )
    op.create_table(
        "workers_seen",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("rules_version", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("seen_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("workers_seen")
    op.drop_table("tick_tasks")
    with op.batch_alter_table("ticks", schema=None) as batch_op:
        batch_op.drop_index("ix_ticks_kind_completed")
    op.drop_table("ticks")
