"""dispatch: an explicit lease and claim token per claimed message, and what settlement needs

A claimed message carries the token of the claim that made it (every write after the
provider call is guarded by it) and an explicit lease expiry from one clock (the
database's on PostgreSQL, the machine's wall clock on SQLite), renewed while its batch
is being sent. An ambiguous message carries when settlement may look it up next, and
every SMS the digest of the body handed to the provider, so settlement can recognise it
among the provider's records.

Revision ID: 0006_dispatch_lease
Revises: 0005_adopt
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0006_dispatch_lease"
down_revision = "0005_adopt"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("claim_token", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True)
        )
        batch_op.add_column(
            sa.Column("lease_expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("settle_after", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("body_digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("body_digest")
        batch_op.drop_column("settle_after")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("claim_token")
