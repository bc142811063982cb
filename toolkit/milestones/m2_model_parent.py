"""Milestone 2: ``ml_models`` becomes the parent of candidates (``ml_candidates.model_id``).

Schema first, each change brief under lock_timeout: a nullable column, its index built
CONCURRENTLY, a foreign key added NOT VALID, and a transition trigger so rows GitLab
writes from now on get ``model_id`` too. Then the backfill in keyset batches, then
VALIDATE of the foreign key (SHARE UPDATE EXCLUSIVE: writes go on).

``experiment_id`` stays until milestone 4: candidates of experiments that have no model
yet would otherwise lose their parent before milestone 3 creates one.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine.catalog_checks import constraint_validated, index_valid, remedy
from toolkit.engine.ddl import SchemaStep, is_applied
from toolkit.engine.listing import count_of, listed
from toolkit.engine.plan import Milestone
from toolkit.engine.results import Check, StepPlan
from toolkit.engine.step import KeysetPass
from toolkit.milestones.base import Supersedable, TransitionTriggerStep
from toolkit.names import M2_COLUMN, M3_CREATED_MODELS
from toolkit.names import M2_FOREIGN_KEY as FK
from toolkit.names import M2_INDEX as INDEX
from toolkit.names import M2_TRIGGER as TRIGGER
from toolkit.words import counted

NAME = "milestone-2"  # this milestone's id: everything else refers to it or to the registry

# One definition of "this candidate's model_id is not what its experiment says".
MISMATCH = "c.model_id IS DISTINCT FROM e.model_id"

# Candidates whose model_id can be wrong: those of a model's default experiment, and any
# that has one (a candidate moved out of such an experiment). The rest stay NULL until
# milestone 3 gives their experiment a model.
NEEDS_A_LOOK = ("experiment_id IN (SELECT id FROM ml_experiments WHERE model_id IS NOT NULL) "
                "OR model_id IS NOT NULL")


def awaiting_milestone_3(conn: Connection) -> str:
    """The candidates (``c``, of experiment ``e``) milestone 3 has yet to link: model_id
    still NULL while their experiment has a model milestone 3 created. Its first pass links
    experiments to new models, a second pass their candidates; in between, those
    candidates are milestone 3's to check (and the MLflow view reaches them through
    ``experiment_id``), not a gap in this milestone's backfill."""
    if not catalog.relation_exists(conn, M3_CREATED_MODELS):
        return "false"
    return f"(c.model_id IS NULL AND e.model_id IN (SELECT model_id FROM {M3_CREATED_MODELS}))"


BACKFILL_BATCH = f"""
WITH changed AS (
    UPDATE ml_candidates c SET model_id = e.model_id
    FROM ml_experiments e
    WHERE c.id > :lo AND c.id <= :hi AND e.id = c.experiment_id AND {MISMATCH}
    RETURNING c.id
)
SELECT count(*) FROM changed"""


class AddModelIdColumn(SchemaStep):
    name = "add-model-id-column"
    description = "add nullable ml_candidates.model_id"
    revision = "m2_0001"
    tables = ("ml_candidates",)

    def verify(self, conn: Connection) -> list[Check]:
        ok = catalog.column_exists(conn, *M2_COLUMN)
        return [Check(name="ml_candidates.model_id exists", ok=ok, detail="present" if ok else "missing",
                      remedy=remedy(ok, NAME))]


class IndexModelId(SchemaStep):
    name = "index-model-id"
    description = f"build {INDEX} CONCURRENTLY (an invalid leftover is rebuilt)"
    revision = "m2_0002"
    tables = ("ml_candidates",)

    def verify(self, conn: Connection) -> list[Check]:
        return [index_valid(conn, INDEX, NAME)]


class AddModelIdForeignKey(SchemaStep):
    name = "add-model-id-foreign-key"
    description = f"add {FK} -> ml_models(id) ON DELETE CASCADE, NOT VALID"
    revision = "m2_0003"
    tables = ("ml_candidates", "ml_models")


class AddTransitionTrigger(TransitionTriggerStep):
    name = "add-transition-trigger"
    description = f"{TRIGGER}: new candidates get model_id from their experiment"
    revision = "m2_0004"
    tables = ("ml_candidates",)
    trigger, table, milestone = TRIGGER, "ml_candidates", NAME


class BackfillModelId(Supersedable):
    name = "backfill-model-id"
    description = "ml_candidates.model_id := its experiment's model (default experiments)"
    milestone = NAME
    superseded_checks = ("every candidate's model_id is its experiment's model",)

    def forward(self) -> list[KeysetPass]:
        return [KeysetPass(self.name, self.description, "ml_candidates", BACKFILL_BATCH,
                           locks=("ml_candidates", "ml_experiments"), driving_filter=NEEDS_A_LOOK)]

    def _count_sql(self, conn: Connection) -> str:
        """The candidates this backfill has left to set: not those milestone 3 links (while
        it runs, the candidates of the experiments it gave a model are its own to count;
        ``status`` showed them as this milestone's rows left beside its state ``verified``)."""
        if not catalog.column_exists(conn, *M2_COLUMN):
            return ("FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id "
                    "WHERE e.model_id IS NOT NULL")
        return (f"FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id "
                f"WHERE {MISMATCH} AND NOT {awaiting_milestone_3(conn)}")

    def plan(self, conn: Connection) -> StepPlan:
        count_from = self._count_sql(conn)
        rows = conn.execute(sa.text(f"SELECT count(*) {count_from}")).scalar_one()
        context: dict[str, int] = dict(conn.execute(sa.text("""
            SELECT CASE WHEN e.model_id IS NULL THEN 'candidates of experiments without a model '
                        || '(get model_id in milestone 3)'
                        ELSE 'candidates of default experiments' END, count(*)
            FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id GROUP BY 1""")).all())
        return StepPlan(step=self.name, description=self.description, rows=rows,
                        breakdown={"set model_id": rows}, context=context, sql=self.forward_sql())

    def remaining(self, conn: Connection) -> int:
        return conn.execute(sa.text(f"SELECT count(*) {self._count_sql(conn)}")).scalar_one()

    def verify(self, conn: Connection) -> list[Check]:
        if not catalog.column_exists(conn, *M2_COLUMN):
            return []
        wrong = listed(conn, f"""
            SELECT c.id AS candidate_id, c.model_id, e.model_id AS experiment_model_id
            FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id
            WHERE {MISMATCH} AND NOT {awaiting_milestone_3(conn)} ORDER BY c.id""")
        return [Check(name=self.superseded_checks[0], ok=not wrong,
                      detail="all match" if not wrong
                      else f"{counted(count_of(wrong), 'candidate')} not matching",
                      remedy=remedy(not wrong, NAME, "it backfills again"),
                      rows=wrong)]


class ValidateForeignKey(SchemaStep):
    name = "validate-model-id-foreign-key"
    description = f"VALIDATE {FK} (SHARE UPDATE EXCLUSIVE: GitLab's writes go on)"
    revision = "m2_0005"
    tables = ("ml_candidates", "ml_models")

    def verify(self, conn: Connection) -> list[Check]:
        return [constraint_validated(conn, "ml_candidates", FK, NAME)]


def schema_applied(conn: Connection) -> bool:
    return is_applied(conn, ValidateForeignKey.revision)


MILESTONE_2 = Milestone(
    name=NAME,
    title="ml_models becomes the parent of candidates (ml_candidates.model_id)",
    steps=(AddModelIdColumn(), IndexModelId(), AddModelIdForeignKey(), AddTransitionTrigger(),
           BackfillModelId(), ValidateForeignKey()),
    reads=("ml_candidates", "ml_experiments", "ml_models"),
    updates=("ml_candidates",),
    adds_columns=("ml_candidates.model_id",),
)
