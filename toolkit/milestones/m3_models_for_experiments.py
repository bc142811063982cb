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

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine import state
from toolkit.engine.catalog_checks import constraint_validated, remedy
from toolkit.engine.ddl import SchemaStep
from toolkit.engine.listing import STREAMED, Listing, count_of, listed, read_to_the_end
from toolkit.engine.plan import Milestone
from toolkit.engine.results import Anomaly, Check, StepPlan
from toolkit.engine.step import KeysetPass, Step
from toolkit.milestones import slug
from toolkit.milestones.base import (
    SUPERSEDED,
    TransitionTriggerStep,
    superseded_by_cleanup,
)
from toolkit.milestones.m2_model_parent import BACKFILL_BATCH, MISMATCH
from toolkit.names import M2_COLUMN, M3_COLUMN
from toolkit.names import M3_CHECK as DISPLAY_CHECK
from toolkit.names import M3_COPIED_METADATA as COPIED
from toolkit.names import M3_CREATED_MODELS as CREATED
from toolkit.names import M3_METADATA_CLASHES as CLASHES
from toolkit.names import M3_TRIGGER as DISPLAY_TRIGGER
from toolkit.words import counted

BACKFILL_DISPLAY_NAME = """
WITH changed AS (
    UPDATE ml_models SET display_name = name
    WHERE id > :lo AND id <= :hi AND display_name IS NULL
    RETURNING id
)
SELECT count(*) FROM changed"""

LOCK_EXPERIMENTS = """
SELECT id, project_id, iid, name FROM ml_experiments
WHERE id > :lo AND id <= :hi AND model_id IS NULL
ORDER BY id FOR UPDATE"""

TAKEN_NAMES = "SELECT project_id, name FROM ml_models WHERE project_id = ANY(:projects)"

CREATE_MODELS = f"""
WITH input AS (
    SELECT * FROM unnest(CAST(:experiment_ids AS bigint[]), CAST(:project_ids AS bigint[]),
                         CAST(:slugs AS text[])) AS t(experiment_id, project_id, slug)
), created AS (
    INSERT INTO ml_models (created_at, updated_at, project_id, name, user_id, display_name)
    SELECT e.created_at, e.updated_at, e.project_id, i.slug, e.user_id, e.name
    FROM input i JOIN ml_experiments e ON e.id = i.experiment_id
    RETURNING id, project_id, name
), linked AS (
    -- each new model is matched to its experiment by (project, slug), never through
    -- the project's other experiments: a project can have thousands
    UPDATE ml_experiments e SET model_id = c.id
    FROM input i JOIN created c ON c.project_id = i.project_id AND c.name = i.slug
    WHERE e.id = i.experiment_id
    RETURNING e.id AS experiment_id, c.id AS model_id, e.project_id
), ledger AS (
    INSERT INTO {CREATED} (model_id, experiment_id, project_id, run_id)
    SELECT model_id, experiment_id, project_id, :run_id FROM linked
)
SELECT count(*) FROM linked"""

RECORD_CLASHES = f"""
INSERT INTO {CLASHES} (experiment_id, name, model_id, experiment_value, model_value, run_id)
SELECT e.id, em.name, e.model_id, em.value, mm.value, :run_id
FROM ml_experiments e
JOIN ml_experiment_metadata em ON em.experiment_id = e.id
JOIN ml_model_metadata mm ON mm.model_id = e.model_id AND mm.name = em.name
WHERE e.id > :lo AND e.id <= :hi AND mm.value <> em.value
ON CONFLICT (experiment_id, name) DO NOTHING"""

COPY_METADATA = f"""
WITH copied AS (
    INSERT INTO ml_model_metadata (created_at, updated_at, model_id, name, value, project_id)
    SELECT em.created_at, em.updated_at, e.model_id, em.name, em.value, em.project_id
    FROM ml_experiments e JOIN ml_experiment_metadata em ON em.experiment_id = e.id
    WHERE e.id > :lo AND e.id <= :hi AND e.model_id IS NOT NULL
    ON CONFLICT (model_id, name) DO NOTHING
    RETURNING id, model_id
)
INSERT INTO {COPIED} (model_metadata_id, model_id, run_id) SELECT id, model_id, :run_id FROM copied"""


def create_models_batch(conn: Connection, lo: int, hi: int, run_id: int | None) -> int:
    """The batch body: the statements of :data:`CREATE_MODELS` and friends, slugs bound."""
    bounds = {"lo": lo, "hi": hi, "run_id": run_id}
    experiments = conn.execute(sa.text(LOCK_EXPERIMENTS), bounds).all()
    created = 0
    if experiments:
        taken: dict[int, set[str]] = {}
        projects = sorted({e.project_id for e in experiments})
        for project_id, name in conn.execute(sa.text(TAKEN_NAMES), {"projects": projects}):
            taken.setdefault(project_id, set()).add(name)
        slugs = slug.assign_all([(e.id, e.project_id, e.iid, e.name) for e in experiments], taken)
        ids = sorted(slugs)
        project_of = {e.id: e.project_id for e in experiments}
        created = conn.execute(sa.text(CREATE_MODELS), {
            "experiment_ids": ids, "project_ids": [project_of[i] for i in ids],
            "slugs": [slugs[i][0] for i in ids], "run_id": run_id,
        }).scalar_one()
    conn.execute(sa.text(RECORD_CLASHES), bounds)
    conn.execute(sa.text(COPY_METADATA), bounds)
    return created


# -- rollback ---------------------------------------------------------------------------
# A created model that GitLab has since given versions or metadata of its own is kept
# (and stays in the ledger): deleting it would delete that work too.
UNDO_BATCH = f"""
SELECT l.model_id, l.experiment_id FROM {CREATED} l
WHERE l.model_id > :lo AND l.model_id <= :hi
  AND NOT EXISTS (SELECT 1 FROM ml_model_versions v WHERE v.model_id = l.model_id)
  AND NOT EXISTS (SELECT 1 FROM ml_model_metadata mm WHERE mm.model_id = l.model_id
                  AND mm.id NOT IN (SELECT model_metadata_id FROM {COPIED}))"""
UNLINK_CANDIDATES = "UPDATE ml_candidates SET model_id = NULL WHERE model_id = ANY(:models)"
UNLINK_EXPERIMENTS = "UPDATE ml_experiments SET model_id = NULL WHERE model_id = ANY(:models)"
DELETE_MODEL_METADATA = "DELETE FROM ml_model_metadata WHERE model_id = ANY(:models)"
DELETE_MODELS = "DELETE FROM ml_models WHERE id = ANY(:models)"
FORGET_MODELS = f"""
DELETE FROM {COPIED} WHERE model_id = ANY(:models);
DELETE FROM {CREATED} WHERE model_id = ANY(:models)"""

REMOVE_COPIED_METADATA = f"""
WITH batch AS (
    DELETE FROM {COPIED} WHERE model_metadata_id > :lo AND model_metadata_id <= :hi
    RETURNING model_metadata_id
), removed AS (
    DELETE FROM ml_model_metadata WHERE id IN (SELECT model_metadata_id FROM batch) RETURNING id
)
SELECT count(*) FROM removed"""

FORGET_CLASHES = f"""
WITH gone AS (DELETE FROM {CLASHES} WHERE experiment_id > :lo AND experiment_id <= :hi RETURNING 1)
SELECT count(*) FROM gone"""


# rollback --dry-run: what the three undo passes would change, counted read-only, each
# as it will find the tables (the first removes the ledger rows of the models it deletes).
REMOVABLE = f"""SELECT l.model_id FROM {CREATED} l
WHERE NOT EXISTS (SELECT 1 FROM ml_model_versions v WHERE v.model_id = l.model_id)
  AND NOT EXISTS (SELECT 1 FROM ml_model_metadata mm WHERE mm.model_id = l.model_id
                  AND mm.id NOT IN (SELECT model_metadata_id FROM {COPIED}))"""
REMOVE_MODELS_COUNT = f"""
WITH removable AS ({REMOVABLE})
SELECT (SELECT count(*) FROM removable),
       (SELECT count(*) FROM {CREATED}) - (SELECT count(*) FROM removable),
       (SELECT count(*) FROM ml_candidates WHERE model_id IN (SELECT model_id FROM removable)),
       (SELECT count(*) FROM ml_experiments WHERE model_id IN (SELECT model_id FROM removable)),
       (SELECT count(*) FROM ml_model_metadata WHERE model_id IN (SELECT model_id FROM removable))"""
REMOVE_METADATA_COUNT = f"""
SELECT count(*) FROM {COPIED} k JOIN ml_model_metadata mm ON mm.id = k.model_metadata_id
WHERE k.model_id NOT IN ({REMOVABLE})"""


def remove_models_count(conn: Connection) -> dict[str, int]:
    removed, kept, candidates, experiments, metadata = conn.execute(sa.text(REMOVE_MODELS_COUNT)).one()
    return {"created models removed": removed,
            "created models kept (GitLab gave them versions or metadata since)": kept,
            "candidates unlinked (model_id := NULL)": candidates,
            "experiments unlinked (model_id := NULL)": experiments,
            "their metadata rows deleted": metadata}


def remove_metadata_count(conn: Connection) -> dict[str, int]:
    return {"copied metadata rows removed from models kept": conn.execute(
        sa.text(REMOVE_METADATA_COUNT)).scalar_one()}


def forget_clashes_count(conn: Connection) -> dict[str, int]:
    return {"recorded metadata clashes forgotten": conn.execute(
        sa.text(f"SELECT count(*) FROM {CLASHES}")).scalar_one()}


def remove_models_batch(conn: Connection, lo: int, hi: int, run_id: int) -> int:
    rows = conn.execute(sa.text(UNDO_BATCH), {"lo": lo, "hi": hi}).all()
    models = [r.model_id for r in rows]
    if not models:
        return 0
    # Unlink first: both foreign keys to ml_models cascade, and a cascade would delete
    # the experiment and its candidates with the model.
    for statement in (UNLINK_CANDIDATES, UNLINK_EXPERIMENTS, DELETE_MODEL_METADATA, DELETE_MODELS,
                      *FORGET_MODELS.strip().split(";\n")):
        conn.execute(sa.text(statement), {"models": models})
    return len(models)


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
    trigger, table, milestone = DISPLAY_TRIGGER, "ml_models", "milestone-3"


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
                          remedy="run `toolkit migrate milestone-3`")]
        missing = listed(conn, "SELECT id AS model_id FROM ml_models WHERE display_name IS NULL ORDER BY id")
        return [Check(name="every model has a display_name", ok=not missing,
                      detail="all do" if not missing else f"{count_of(missing)} have none",
                      remedy=remedy(not missing, "milestone-3"), rows=missing)]


class ValidateDisplayNameCheck(SchemaStep):
    name = "validate-display-name-check"
    description = f"VALIDATE {DISPLAY_CHECK}"
    revision = "m3_0003"
    tables = ("ml_models",)

    def verify(self, conn: Connection) -> list[Check]:
        return [constraint_validated(conn, "ml_models", DISPLAY_CHECK, "milestone-3")]


def planned_slugs(conn: Connection) -> Iterator[PlannedSlug]:
    """The slug every experiment without a model would get, exactly as apply computes it.

    Streamed one project at a time (experiments and model names both ordered by project),
    so only one project's names are ever in memory, however many projects there are.
    """
    read_to_the_end(conn)
    models = groupby(conn.execute(sa.text(
        "SELECT project_id, name FROM ml_models ORDER BY project_id"), execution_options=STREAMED),
        key=lambda r: r.project_id)
    experiments = groupby(conn.execute(sa.text(
        "SELECT id, project_id, iid, name FROM ml_experiments WHERE model_id IS NULL "
        "ORDER BY project_id, id"), execution_options=STREAMED), key=lambda r: r.project_id)
    names_project, names = next(models, (None, iter(())))
    for project_id, rows in experiments:
        while names_project is not None and names_project < project_id:
            names_project, names = next(models, (None, iter(())))
        taken = {r.name for r in names} if names_project == project_id else set()
        for e in rows:
            chosen, base, fell_back = slug.assign(e.name, e.iid, taken)
            yield PlannedSlug(e.id, project_id, e.name, chosen, base, fell_back)


@dataclass(frozen=True)
class PlannedSlug:
    experiment_id: int
    project_id: int
    name: str
    slug: str
    wanted: str  # the slug before a suffix (or the fallback)
    fell_back: bool


class CreateModelsForExperiments(Step):
    name = "create-models-for-experiments"
    description = ("one model per experiment without one (name = slug, display_name = experiment "
                   "name), linked as its default experiment; its metadata follows")

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
        if superseded_by_cleanup(conn):
            return 0
        return conn.execute(sa.text(
            "SELECT count(*) FROM ml_experiments WHERE model_id IS NULL")).scalar_one()

    def plan(self, conn: Connection) -> StepPlan:
        if superseded_by_cleanup(conn):
            return StepPlan(step=self.name, description=self.description, rows=0, context={SUPERSEDED: 0},
                            sql=self.forward_sql())
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
        # Clashes: metadata of default experiments that their model already has, differently.
        clashes = listed(conn, """
            SELECT e.id AS experiment_id, e.model_id, em.name, left(em.value, 100) AS experiment_value,
                   left(mm.value, 100) AS model_value
            FROM ml_experiments e JOIN ml_experiment_metadata em ON em.experiment_id = e.id
            JOIN ml_model_metadata mm ON mm.model_id = e.model_id AND mm.name = em.name
            WHERE mm.value <> em.value ORDER BY e.id, em.name""")
        context: dict[str, int] = dict(
            conn.execute(
                sa.text("""
            SELECT 'experiment metadata rows to copy', count(*) FROM ml_experiment_metadata em
            JOIN ml_experiments e ON e.id = em.experiment_id
            WHERE NOT EXISTS (SELECT 1 FROM ml_model_metadata mm
                              WHERE mm.model_id = e.model_id AND mm.name = em.name)
            UNION ALL
            SELECT 'experiments that already have a model (kept)', count(*) FROM ml_experiments
            WHERE model_id IS NOT NULL""")
            ).all()
        )
        anomalies = [
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
        return StepPlan(step=self.name, description=self.description, rows=to_create,
                        breakdown={"models to create": to_create}, context=context, anomalies=anomalies,
                        sql=self.forward_sql())

    def verify(self, conn: Connection) -> list[Check]:
        if superseded_by_cleanup(conn):
            return [Check(name="every experiment has a model", ok=True, detail=SUPERSEDED)]
        orphans = listed(conn, "SELECT id AS experiment_id, name FROM ml_experiments "
                              "WHERE model_id IS NULL ORDER BY id")
        checks = [Check(name="every experiment has a model", ok=not orphans,
                        detail="all do" if not orphans
                        else f"{counted(count_of(orphans), 'experiment')} without one",
                        remedy=remedy(not orphans, "milestone-3", "it catches up"),
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
                      "`toolkit rollback milestone-3` again" if left else None, rows=left)]


MILESTONE_2_SETS_FIRST = ("candidates of experiments that have a model: milestone 2 sets their "
                         "model_id first (counted there, not here)")


def milestone_2_backfilled(conn: Connection) -> bool:
    """Whether milestone 2 has applied its backfill: until then the candidates of experiments
    that already have a model are its rows, not this milestone's."""
    return state.milestone_state(conn, "milestone-2")["state"] in (state.APPLIED, state.VERIFIED)


class LinkCandidates(Step):
    """The candidates' ``model_id``, in batches over ``ml_candidates.id`` (table order),
    after every experiment has its model: milestone 2's backfill statement, run again.

    No ``driving_filter``: once the experiments are linked, every candidate can need a
    change (milestone 2's filter would keep nearly all of them, at the cost of a subquery
    per batch), and most do (those of the experiments just given a model). No catch-up
    either: candidates inserted after the pass took its bound get ``model_id`` from the
    transition trigger, from their experiment as it is linked by then."""

    name = "link-candidates"
    description = "ml_candidates.model_id := its experiment's model, in batches in table order"

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
        if superseded_by_cleanup(conn):
            return 0
        new_model, differ = self._counts(conn)
        return new_model + (differ if milestone_2_backfilled(conn) else 0)

    def plan(self, conn: Connection) -> StepPlan:
        if superseded_by_cleanup(conn):
            return StepPlan(step=self.name, description=self.description, rows=0, context={SUPERSEDED: 0},
                            sql=self.forward_sql())
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
        name = "every candidate's model_id is its experiment's model"
        if superseded_by_cleanup(conn):
            return [Check(name=name, ok=True, detail=SUPERSEDED)]
        if not catalog.column_exists(conn, *M2_COLUMN):
            return [Check(name=name, ok=False, detail="ml_candidates.model_id does not exist",
                          remedy="apply milestone-2 first")]
        mismatched = listed(conn, f"""
            SELECT c.id AS candidate_id, c.model_id, e.model_id AS experiment_model_id
            FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id
            WHERE {MISMATCH} ORDER BY c.id""")
        return [Check(name=name, ok=not mismatched,
                      detail="all match" if not mismatched else f"{count_of(mismatched)} differ",
                      remedy=remedy(not mismatched, "milestone-3"), rows=mismatched)]


MILESTONE_3 = Milestone(
    name="milestone-3",
    number=3,
    title="A display-named model for every experiment",
    steps=(AddDisplayName(), AddDisplayNameTrigger(), BackfillDisplayName(), ValidateDisplayNameCheck(),
           CreateModelsForExperiments(), LinkCandidates()),
    reads=("ml_experiments", "ml_experiment_metadata", "ml_models", "ml_model_metadata",
           "ml_candidates", "ml_model_versions"),
    updates=("ml_models", "ml_experiments", "ml_candidates", "ml_model_metadata"),
    adds_columns=("ml_models.display_name",),
)
