"""Milestone 3: transition trigger giving models GitLab creates a display_name.

GitLab does not know the column yet; a model it inserts gets display_name = name.
Milestone 4 removes the trigger with the other transition triggers.

Revision ID: m3_0002
Revises: m3_0001
Create Date: 2026-11-23
"""

from alembic import op

from toolkit.names import M3_TRIGGER as NAME

revision = "m3_0002"
down_revision = "m3_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(f"""
CREATE OR REPLACE FUNCTION {NAME}() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
IF NEW.display_name IS NULL THEN
  NEW.display_name := NEW.name;
END IF;
RETURN NEW;
END
$$""")
    op.execute(f"CREATE TRIGGER {NAME} BEFORE INSERT ON ml_models FOR EACH ROW EXECUTE FUNCTION {NAME}()")


def downgrade() -> None:
    op.execute(f"DROP TRIGGER IF EXISTS {NAME} ON ml_models")
    op.execute(f"DROP FUNCTION IF EXISTS {NAME}()")
