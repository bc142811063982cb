"""Milestone 2: nullable ml_candidates.model_id.

Adding a nullable column without a default only changes the catalog: the ACCESS EXCLUSIVE
lock is held for milliseconds (the toolkit runs it under lock_timeout with retries).

Revision ID: m2_0001
Revises:
Create Date: 2026-11-23
"""

from alembic import op

revision = "m2_0001"
down_revision = None
branch_labels = ("gitlab",)
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE ml_candidates ADD COLUMN IF NOT EXISTS model_id bigint")


def downgrade() -> None:
    op.execute("ALTER TABLE ml_candidates DROP COLUMN IF EXISTS model_id")
