"""Milestone 2: index on ml_candidates.model_id, built CONCURRENTLY.

An interrupted CONCURRENTLY build leaves an INVALID index behind (and ``IF NOT EXISTS``
would then skip the rebuild), so an invalid one is dropped first.

Revision ID: m2_0002
Revises: m2_0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import context, op

from toolkit.names import M2_INDEX as INDEX

revision = "m2_0002"
down_revision = "m2_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        if context.is_offline_mode():
            op.execute(f"-- if {INDEX} exists but is INVALID (an interrupted build): "
                       f"DROP INDEX CONCURRENTLY {INDEX}")
        elif op.get_bind().execute(sa.text(
            "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:i)"), {"i": INDEX}
        ).scalar():
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON ml_candidates USING btree (model_id)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
