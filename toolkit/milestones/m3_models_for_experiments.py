"""Milestone 3: a display-named model for every experiment.

Models get ``display_name`` (the experiment name, verbatim, for the models this creates;
the model's own name for models that exist). Every experiment without a model gets one in
its project, named by a slug GitLab's model-name rule accepts (:mod:`slug`), and becomes
its default experiment; its candidates get ``model_id``; its metadata is copied to the
model. Metadata of experiments that already were a model's default experiment is copied
too (after milestone 4 it is the only copy); a name the model already has with a
different value is a clash, recorded in ``toolkit.m3_metadata_clashes``, never overwritten.

Two passes. ``create-models-for-experiments``, per batch of experiments, one transaction:
lock the batch's experiments (FOR UPDATE), compute slugs against the names taken in their
projects, create the models and link the experiments, record clashes and copy metadata;
the ledgers let rollback remove exactly what was created. ``link-candidates`` then sets
the candidates' ``model_id`` in batches over ``ml_candidates.id``, in table order. The
candidates of one batch of experiments lie all over ``ml_candidates``: set there, each
batch visited much of the table, and the batched apply ran at 0.8 to 0.9 of the same
change done set-based. Nothing needs an experiment and its candidates linked in one
transaction:

- in between, a candidate whose ``model_id`` is still NULL reaches its experiment through
  ``experiment_id`` (the MLflow view, :func:`toolkit.verify.fingerprint.run_parent`), so
  what MLflow clients see is the same before, between and after the passes;
- candidates GitLab inserts or moves meanwhile get ``model_id`` from milestone 2's
  transition trigger, which reads their experiment FOR SHARE (it waits for a batch that
  is linking that experiment), so rows past the candidate pass's end are covered;
- verify proves the end state (every candidate's ``model_id`` is its experiment's model),
  and rollback unlinks candidates by the created models' ids, whichever passes ran.
"""

from __future__ import annotations

from operator import itemgetter

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine import state
from toolkit.engine.catalog_checks import constraint_validated, remedy
from toolkit.engine.ddl import SchemaStep
from toolkit.engine.listing import Listing, count_of, listed
from toolkit.engine.plan import Milestone
from toolkit.engine.results import Anomaly, Check, MilestoneState, StepPlan
from toolkit.engine.step import KeysetPass, Step
from toolkit.milestones import slug
from toolkit.milestones.base import Supersedable, TransitionTriggerStep
from toolkit.milestones.m2_model_parent import BACKFILL_BATCH, MISMATCH
from toolkit.milestones.m2_model_parent import NAME as M2
from toolkit.milestones.m3_create import (
    COPY_METADATA,
    CREATE_MODELS,
    LOCK_EXPERIMENTS,
    RECORD_CLASHES,
    TAKEN_NAMES,
    create_models_batch,
    planned_slugs,
)
from toolkit.milestones.m3_undo import (
    DELETE_MODEL_METADATA,
    DELETE_MODELS,
    FORGET_CLASHES,
    FORGET_MODELS,
    REMOVE_COPIED_METADATA,
    UNDO_BATCH,
    UNLINK_CANDIDATES,
    UNLINK_EXPERIMENTS,
    forget_clashes_count,
    remove_metadata_count,
    remove_models_batch,
    remove_models_count,
)
from toolkit.names import M2_COLUMN, M3_COLUMN
from toolkit.names import M3_CHECK as DISPLAY_CHECK
from toolkit.names import M3_COPIED_METADATA as COPIED
from toolkit.names import M3_CREATED_MODELS as CREATED
from toolkit.names import M3_METADATA_CLASHES as CLASHES
from toolkit.names import M3_TRIGGER as DISPLAY_TRIGGER
from toolkit.words import counted

NAME = "milestone-3"  # this milestone's id: everything else refers to it or to the registry

BACKFILL_DISPLAY_NAME = """
WITH changed AS (
    UPDATE ml_models SET display_name = name
    WHERE id > :lo AND id <= :hi AND display_name IS NULL
    RETURNING id
)
SELECT count(*) FROM changed"""

def registry_additions_check(conn: Connection) -> Check:
    """What milestone 3 added to the registry is exactly its ledgers: every created model is
    there, its tags are the metadata it copied (no other), and every copied tag is there. The
    fingerprint's registry parts prove the rest of the registry unchanged (verify/baselines.py)."""
    odd = listed(conn, f"""
        SELECT l.model_id, NULL::text AS tag, 'created model missing' AS problem FROM {CREATED} l
        WHERE NOT EXISTS (SELECT 1 FROM ml_models m WHERE m.id = l.model_id)
        UNION ALL
        SELECT mm.model_id, mm.name, 'tag of a created model that milestone 3 did not copy'
        FROM {CREATED} l JOIN ml_model_metadata mm ON mm.model_id = l.model_id
        WHERE mm.id NOT IN (SELECT model_metadata_id FROM {COPIED})
        UNION ALL
        SELECT k.model_id, NULL, 'copied tag missing' FROM {COPIED} k
        WHERE NOT EXISTS (SELECT 1 FROM ml_model_metadata mm WHERE mm.id = k.model_metadata_id)
        ORDER BY 1, 2""")
    return Check(name="the registry gained exactly the created models and the copied tags", ok=not odd,
                 detail="as the ledgers say" if not odd else f"{count_of(odd)} differ from the ledgers",
                 remedy=None if not odd else "find out what changed these models (GitLab's audit events)",
                 rows=odd)


class AddDisplayName(SchemaStep):
    name = "add-display-name"
    description = f"add ml_models.display_name with {DISPLAY_CHECK} (<= 255) NOT VALID"
    revision = "m3_0001"
    tables = ("ml_models",)


class AddDisplayNameTrigger(TransitionTriggerStep):
    name = "add-display-name-trigger"
    description = f"{DISPLAY_TRIGGER}: models GitLab creates get display_name = name"
    revision = "m3_0002"
    tables = ("ml_models",)
    trigger, table, milestone = DISPLAY_TRIGGER, "ml_models", NAME


class BackfillDisplayName(Step):
    name = "backfill-display-name"
    description = "existing models: display_name := name"

    def forward(self) -> list[KeysetPass]:
        return [KeysetPass(self.name, self.description, "ml_models", BACKFILL_DISPLAY_NAME,
                           locks=("ml_models",), catch_up=True)]

    def remaining(self, conn: Connection) -> int:
        where = "display_name IS NULL" if catalog.column_exists(conn, *M3_COLUMN) else "true"
        return conn.execute(sa.text(f"SELECT count(*) FROM ml_models WHERE {where}")).scalar_one()

    def plan(self, conn: Connection) -> StepPlan:
        rows = self.remaining(conn)
        return StepPlan(step=self.name, description=self.description, rows=rows,
                        breakdown={"display_name := name": rows}, sql=self.forward_sql())

    def verify(self, conn: Connection) -> list[Check]:
        if not catalog.column_exists(conn, *M3_COLUMN):
            return [Check(name="ml_models.display_name exists", ok=False, detail="missing",
                          remedy=f"run `toolkit migrate {NAME}`")]
        missing = listed(conn, "SELECT id AS model_id FROM ml_models WHERE display_name IS NULL ORDER BY id")
        return [Check(name="every model has a display_name", ok=not missing,
                      detail="all do" if not missing else f"{count_of(missing)} have none",
                      remedy=remedy(not missing, NAME), rows=missing)]


class ValidateDisplayNameCheck(SchemaStep):
    name = "validate-display-name-check"
    description = f"VALIDATE {DISPLAY_CHECK}"
    revision = "m3_0003"
    tables = ("ml_models",)

    def verify(self, conn: Connection) -> list[Check]:
        return [constraint_validated(conn, "ml_models", DISPLAY_CHECK, NAME)]


def slug_listings(conn: Connection) -> tuple[int, Listing, Listing]:
    """The models to create, and the experiments whose slug is not their name's: taken in
    the project (a suffix is added), or nothing left after slugging (the fallback)."""
    to_create = 0
    collisions, fallbacks = Listing([], 0), Listing([], 0)
    for planned in planned_slugs(conn):
        to_create += 1
        row = {"experiment_id": planned.experiment_id, "project_id": planned.project_id,
               "name": planned.name, "wanted": planned.wanted, "slug": planned.slug}
        if planned.fell_back:
            del row["wanted"]
            fallbacks.add(row)
        elif planned.slug != planned.wanted:
            collisions.add(row)
    collisions.sort(key=itemgetter("experiment_id"))
    fallbacks.sort(key=itemgetter("experiment_id"))
    return to_create, collisions, fallbacks


def plan_anomalies(collisions: Listing, fallbacks: Listing, clashes: Listing) -> list[Anomaly]:
    """What the plan shows the operator before models are created (none of it blocks)."""
    return [
        Anomaly(
            kind="slug_collision",
            title="slug taken in the project: a suffix is added",
            blocking=False,
            resolution="Nothing to do: the model's display_name keeps the experiment's name; only "
            "its URL-safe name differs.",
            rows=collisions,
        ),
        Anomaly(
            kind="slug_fallback",
            title="nothing left after slugging: experiment_<iid> is used",
            blocking=False,
            resolution="Nothing to do; rename the model in GitLab afterwards if you want another name.",
            rows=fallbacks,
        ),
        Anomaly(
            kind="metadata_clash",
            title="model already has this metadata key with another value",
            blocking=False,
            resolution="The model's value is kept; the experiment's is recorded in "
            "toolkit.m3_metadata_clashes (and archived by milestone 4). Decide which to keep.",
            rows=clashes,
        ),
    ]


class CreateModelsForExperiments(Supersedable):
    name = "create-models-for-experiments"
    description = ("one model per experiment without one (name = slug, display_name = experiment "
                   "name), linked as its default experiment; its metadata follows")
    milestone = NAME
    superseded_checks = ("every experiment has a model",)

    def forward(self) -> list[KeysetPass]:
        sql = ";\n".join(s.strip() for s in (LOCK_EXPERIMENTS, TAKEN_NAMES, CREATE_MODELS,
                                             RECORD_CLASHES, COPY_METADATA))
        return [KeysetPass(self.name, self.description, "ml_experiments", sql,
                           locks=("ml_experiments", "ml_models"),
                           retry_unique_violation=True, catch_up=True, apply=create_models_batch)]

    def backward(self) -> list[KeysetPass]:
        undo = ";\n".join(s.strip() for s in (UNDO_BATCH, UNLINK_CANDIDATES, UNLINK_EXPERIMENTS,
                                              DELETE_MODEL_METADATA, DELETE_MODELS, FORGET_MODELS))
        return [
            # catch_up: an experiments/create through the server that read the stage just
            # before the rollback began commits its model after the pass took its bound
            KeysetPass(f"{self.name}:revert", "remove the models milestone 3 created", CREATED, undo,
                       key="model_id", locks=("ml_models", "ml_experiments", "ml_candidates"),
                       catch_up=True, apply=remove_models_batch, count=remove_models_count),
            KeysetPass(f"{self.name}:revert-metadata", "remove metadata copied to existing models",
                       COPIED, REMOVE_COPIED_METADATA, key="model_metadata_id",
                       locks=("ml_model_metadata",), count=remove_metadata_count),
            KeysetPass(f"{self.name}:forget-clashes", "forget the recorded metadata clashes",
                       CLASHES, FORGET_CLASHES, key="experiment_id", count=forget_clashes_count),
        ]

    def remaining(self, conn: Connection) -> int:
        return conn.execute(sa.text(
            "SELECT count(*) FROM ml_experiments WHERE model_id IS NULL")).scalar_one()

    def plan(self, conn: Connection) -> StepPlan:
        to_create, collisions, fallbacks = slug_listings(conn)
        # Clashes: metadata of default experiments that their model already has, differently.
        clashes = listed(conn, """
            SELECT e.id AS experiment_id, e.model_id, em.name, left(em.value, 100) AS experiment_value,
                   left(mm.value, 100) AS model_value
            FROM ml_experiments e JOIN ml_experiment_metadata em ON em.experiment_id = e.id
            JOIN ml_model_metadata mm ON mm.model_id = e.model_id AND mm.name = em.name
            WHERE mm.value <> em.value ORDER BY e.id, em.name""")
        context: dict[str, int] = dict(conn.execute(sa.text("""
            SELECT 'experiment metadata rows to copy', count(*) FROM ml_experiment_metadata em
            JOIN ml_experiments e ON e.id = em.experiment_id
            WHERE NOT EXISTS (SELECT 1 FROM ml_model_metadata mm
                              WHERE mm.model_id = e.model_id AND mm.name = em.name)
            UNION ALL
            SELECT 'experiments that already have a model (kept)', count(*) FROM ml_experiments
            WHERE model_id IS NOT NULL""")).all())
        return StepPlan(step=self.name, description=self.description, rows=to_create,
                        breakdown={"models to create": to_create}, context=context,
                        anomalies=plan_anomalies(collisions, fallbacks, clashes), sql=self.forward_sql())

    def verify(self, conn: Connection) -> list[Check]:
        orphans = listed(conn, "SELECT id AS experiment_id, name FROM ml_experiments "
                              "WHERE model_id IS NULL ORDER BY id")
        checks = [Check(name=self.superseded_checks[0], ok=not orphans,
                        detail="all do" if not orphans
                        else f"{counted(count_of(orphans), 'experiment')} without one",
                        remedy=remedy(not orphans, NAME, "it catches up"),
                        rows=orphans)]
        if catalog.column_exists(conn, *M3_COLUMN) and catalog.relation_exists(conn, CREATED):
            wrong = listed(
                conn,
                f"""
                SELECT m.id AS model_id, m.display_name, e.name AS experiment_name
                FROM {CREATED} l JOIN ml_models m ON m.id = l.model_id
                JOIN ml_experiments e ON e.id = l.experiment_id
                WHERE m.display_name IS DISTINCT FROM e.name ORDER BY m.id""",
            )
            checks.append(Check(name="created models' display_name is the experiment's name", ok=not wrong,
                                detail="all are" if not wrong else f"{count_of(wrong)} differ",
                                remedy=None if not wrong else "find out what renamed them", rows=wrong))
            # A name of ASCII word characters, '-' and '.' passes GitLab's rule (every slug
            # is one); only the others go through the rule itself, in Python. (Not as
            # {1,255}: PostgreSQL's regex engine takes 100 times longer over a bound.)
            bad = listed(conn, f"""
                SELECT m.id AS model_id, m.name FROM {CREATED} l JOIN ml_models m ON m.id = l.model_id
                WHERE m.name !~ '^[A-Za-z0-9_.-]+$' OR char_length(m.name) > {slug.MAX_LENGTH}
                ORDER BY m.id""", keep=lambda r: not slug.is_valid_model_name(r["name"]))
            checks.append(
                Check(name="created model names pass GitLab's model-name rule", ok=not bad,
                      detail="all do" if not bad else f"{count_of(bad)} do not", remedy=None, rows=bad)
            )
            checks.append(registry_additions_check(conn))
        return checks

    def rollback_checks(self, conn: Connection) -> list[Check]:
        left = listed(conn, f"SELECT model_id, experiment_id FROM {CREATED} ORDER BY model_id") \
            if catalog.relation_exists(conn, CREATED) else []
        return [Check(name="every created model removed", ok=not left,
                      detail="none left" if not left else
                      f"{counted(count_of(left), 'model')} kept: GitLab gave them versions or metadata since",
                      remedy="decide about each model (delete it in GitLab, or keep it), then run "
                      f"`toolkit rollback {NAME}` again" if left else None, rows=left)]


MILESTONE_2_SETS_FIRST = ("candidates of experiments that have a model: milestone 2 sets their "
                         "model_id first (counted there, not here)")


def milestone_2_backfilled(conn: Connection) -> bool:
    """Whether milestone 2 has applied its backfill: until then the candidates of experiments
    that already have a model are its rows, not this milestone's."""
    return state.milestone_state(conn, M2)["state"] in (MilestoneState.APPLIED, MilestoneState.VERIFIED)


class LinkCandidates(Supersedable):
    """The candidates' ``model_id``, in batches over ``ml_candidates.id`` (table order),
    after every experiment has its model: milestone 2's backfill statement, run again.

    No ``driving_filter``: once the experiments are linked, every candidate can need a
    change (milestone 2's filter would keep nearly all of them, at the cost of a subquery
    per batch), and most do (those of the experiments just given a model). No catch-up
    either: candidates inserted after the pass took its bound get ``model_id`` from the
    transition trigger, from their experiment as it is linked by then."""

    name = "link-candidates"
    description = "ml_candidates.model_id := its experiment's model, in batches in table order"
    milestone = NAME
    superseded_checks = ("every candidate's model_id is its experiment's model",)

    def forward(self) -> list[KeysetPass]:
        return [KeysetPass(self.name, self.description, "ml_candidates", BACKFILL_BATCH,
                           locks=("ml_candidates", "ml_experiments"))]

    def _counts(self, conn: Connection) -> tuple[int, int]:
        """Candidates the pass will change: those of experiments without a model (the first
        pass gives each a new one), and those whose ``model_id`` differs from their
        experiment's model already."""
        candidate_model = "c.model_id" if catalog.column_exists(conn, *M2_COLUMN) else "NULL::bigint"
        new_model, differ = conn.execute(sa.text(f"""
            SELECT count(*) FILTER (WHERE e.model_id IS NULL),
                   count(*) FILTER (WHERE e.model_id IS NOT NULL)
            FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id
            WHERE e.model_id IS NULL OR {candidate_model} IS DISTINCT FROM e.model_id""")).one()
        return new_model, differ

    def remaining(self, conn: Connection) -> int:
        new_model, differ = self._counts(conn)
        return new_model + (differ if milestone_2_backfilled(conn) else 0)

    def plan(self, conn: Connection) -> StepPlan:
        new_model, differ = self._counts(conn)
        context = {}
        if not milestone_2_backfilled(conn):
            # Milestone 2's backfill sets these before this milestone may start: counted
            # there, not twice in a plan of every milestone (its total would not add up).
            context[MILESTONE_2_SETS_FIRST] = differ
            differ = 0
        return StepPlan(step=self.name, description=self.description, rows=new_model + differ,
                        breakdown={"candidates of experiments that get a model": new_model,
                                   "candidates whose model_id differs from their experiment's": differ},
                        context=context, sql=self.forward_sql())

    def verify(self, conn: Connection) -> list[Check]:
        name = self.superseded_checks[0]
        if not catalog.column_exists(conn, *M2_COLUMN):
            return [Check(name=name, ok=False, detail="ml_candidates.model_id does not exist",
                          remedy=f"apply {M2} first")]
        mismatched = listed(conn, f"""
            SELECT c.id AS candidate_id, c.model_id, e.model_id AS experiment_model_id
            FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id
            WHERE {MISMATCH} ORDER BY c.id""")
        return [Check(name=name, ok=not mismatched,
                      detail="all match" if not mismatched else f"{count_of(mismatched)} differ",
                      remedy=remedy(not mismatched, NAME), rows=mismatched)]


MILESTONE_3 = Milestone(
    name=NAME,
    title="A display-named model for every experiment",
    steps=(AddDisplayName(), AddDisplayNameTrigger(), BackfillDisplayName(), ValidateDisplayNameCheck(),
           CreateModelsForExperiments(), LinkCandidates()),
    reads=("ml_experiments", "ml_experiment_metadata", "ml_models", "ml_model_metadata",
           "ml_candidates", "ml_model_versions"),
    updates=("ml_models", "ml_experiments", "ml_candidates", "ml_model_metadata"),
    adds_columns=("ml_models.display_name",),
)
