"""Milestone 2: VALIDATE the model_id foreign key (after the backfill).

Revision ID: m2_0005
Revises: m2_0004
Create Date: 2026-11-23
"""

from alembic import op

from toolkit.names import M2_FOREIGN_KEY as FK

revision = "m2_0005"
down_revision = "m2_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(f"ALTER TABLE ml_candidates VALIDATE CONSTRAINT {FK}")


def downgrade() -> None:
    # Back to exactly the state of m2_0004: the same constraint, NOT VALID.
    op.execute(f"ALTER TABLE ml_candidates DROP CONSTRAINT IF EXISTS {FK}")
    op.execute(f"ALTER TABLE ml_candidates ADD CONSTRAINT {FK} FOREIGN KEY (model_id) "
               "REFERENCES ml_models(id) ON DELETE CASCADE NOT VALID")
