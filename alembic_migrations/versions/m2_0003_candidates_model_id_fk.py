"""Milestone 2: foreign key ml_candidates.model_id -> ml_models(id) ON DELETE CASCADE, NOT VALID.

NOT VALID skips the scan of existing rows, so the lock is brief; rows are checked by the
later VALIDATE, which takes only SHARE UPDATE EXCLUSIVE (writes go on).

Revision ID: m2_0003
Revises: m2_0002
Create Date: 2026-11-23
"""

from alembic import op

from toolkit.names import M2_FOREIGN_KEY as FK

revision = "m2_0003"
down_revision = "m2_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(f"ALTER TABLE ml_candidates ADD CONSTRAINT {FK} FOREIGN KEY (model_id) "
               "REFERENCES ml_models(id) ON DELETE CASCADE NOT VALID")


def downgrade() -> None:
    op.execute(f"ALTER TABLE ml_candidates DROP CONSTRAINT IF EXISTS {FK}")
