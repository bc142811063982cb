"""Milestone 2: transition trigger filling ml_candidates.model_id from the experiment.

GitLab keeps writing candidates through experiment_id while the milestones run. On
INSERT the trigger fills a NULL model_id from ml_experiments.model_id; on UPDATE OF
experiment_id it follows the new experiment. Milestone 4 removes it.

The experiment is read FOR SHARE: milestone 3 links experiments to new models while
GitLab inserts their candidates, and a plain read would see the experiment as it was
before a link committed a millisecond later, leaving the new candidate without its
model. FOR SHARE waits for that link (one batch) and reads the linked row. Writers of
other experiments are not affected.

Revision ID: m2_0004
Revises: m2_0003
Create Date: 2026-11-23
"""

from alembic import op

from toolkit.names import M2_TRIGGER as NAME

revision = "m2_0004"
down_revision = "m2_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(f"""
CREATE OR REPLACE FUNCTION {NAME}() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
IF TG_OP = 'INSERT' AND NEW.model_id IS NOT NULL THEN
  RETURN NEW;
END IF;
SELECT model_id INTO NEW.model_id FROM ml_experiments WHERE id = NEW.experiment_id FOR SHARE;
RETURN NEW;
END
$$""")
    op.execute(f"""
CREATE TRIGGER {NAME} BEFORE INSERT OR UPDATE OF experiment_id ON ml_candidates
FOR EACH ROW EXECUTE FUNCTION {NAME}()""")


def downgrade() -> None:
    op.execute(f"DROP TRIGGER IF EXISTS {NAME} ON ml_candidates")
    op.execute(f"DROP FUNCTION IF EXISTS {NAME}()")
