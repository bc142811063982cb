"""Milestone 3: ml_models.display_name (text) with a length CHECK added NOT VALID.

Revision ID: m3_0001
Revises: m2_0005
Create Date: 2026-11-23
"""

from alembic import op

from toolkit.names import M3_CHECK as CHECK

revision = "m3_0001"
down_revision = "m2_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE ml_models ADD COLUMN IF NOT EXISTS display_name text")
    op.execute(f"ALTER TABLE ml_models ADD CONSTRAINT {CHECK} "
               "CHECK (char_length(display_name) <= 255) NOT VALID")


def downgrade() -> None:
    op.execute(f"ALTER TABLE ml_models DROP CONSTRAINT IF EXISTS {CHECK}")
    op.execute("ALTER TABLE ml_models DROP COLUMN IF EXISTS display_name")
