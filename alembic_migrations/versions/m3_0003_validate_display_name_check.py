"""Milestone 3: VALIDATE the display_name length CHECK.

Revision ID: m3_0003
Revises: m3_0002
Create Date: 2026-11-23
"""

from alembic import op

from toolkit.names import M3_CHECK as CHECK

revision = "m3_0003"
down_revision = "m3_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(f"ALTER TABLE ml_models VALIDATE CONSTRAINT {CHECK}")


def downgrade() -> None:
    op.execute(f"ALTER TABLE ml_models DROP CONSTRAINT IF EXISTS {CHECK}")
    op.execute(f"ALTER TABLE ml_models ADD CONSTRAINT {CHECK} "
               "CHECK (char_length(display_name) <= 255) NOT VALID")
