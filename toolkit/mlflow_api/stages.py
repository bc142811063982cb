"""Where an MLflow write goes at each stage of the blueprint, read in the write's own
transaction.

The blueprint changes what ``experiments/create`` means (milestone 3: "create a model
instead of an experiment"), and where a run's parent lives (``experiment_id`` until
milestone 4 drops it, ``model_id`` after). The server's write endpoints ask this module,
never the catalog themselves, so one place knows the stages:

- :data:`Stage.EXPERIMENTS` before milestone 3 (and while it rolls back): GitLab as it is;
- :data:`Stage.MODELS` milestone 3 running or done, ``ml_experiments`` still there: an
  experiment and its display-named model, made in one transaction, recorded in
  milestone 3's ledger so its rollback removes them as it removes its own;
- :data:`Stage.ARCHIVE` milestone 4 dropped the experiments, its archive holds them: a
  model only, its MLflow experiment id kept where the view reads it;
- :data:`Stage.KEPT_IDS` after ``toolkit archive drop``: the same, in the kept ids.

The stage is the fingerprint's MLflow source (:func:`toolkit.verify.fingerprint.mlflow_source`)
refined by milestone 3's state, so what the server writes is where ``verify`` and the
reads look.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists, relation_exists
from toolkit.engine.results import STARTED, MilestoneState
from toolkit.engine.state import milestone_state
from toolkit.milestones import slug
from toolkit.milestones.m3_create import create_models_batch
from toolkit.milestones.m3_models_for_experiments import NAME as M3
from toolkit.milestones.m4 import NAME as M4
from toolkit.names import (
    M3_COPIED_METADATA,
    M3_CREATED_MODELS,
    M4_ARCHIVE_EXPERIMENTS,
    M4_ARCHIVE_METADATA,
    M4_EXPERIMENT_IDS,
)
from toolkit.verify.fingerprint import (
    FROM_EXPERIMENTS,
    FROM_MODELS,
    FROM_MODELS_AND_ARCHIVE,
    FROM_MODELS_AND_IDS,
    experiments_view,
    mlflow_source,
)


class Stage(Enum):
    EXPERIMENTS = "experiments"
    MODELS = "experiments with models"
    ARCHIVE = "models, experiment ids in milestone 4's archive"
    KEPT_IDS = "models, experiment ids kept for good"


class StageChanged(Exception):
    """The stage changed under the write: a milestone's (or its rollback's, or ``toolkit
    archive drop``'s) schema change committed while the write waited for its lock. Nothing
    was written; the transaction must be rolled back and the request answered 503
    ``TEMPORARILY_UNAVAILABLE`` (the client retries, and meets the new stage)."""


class WritesPaused(StageChanged):
    """A moment of the migration that takes no MLflow write, answered 503 at once (the
    client retries): milestone 4's rollback, from rebuilding the experiments' tables to
    checking them row for row against the archive (a write in between would be neither in
    the archive nor in the check); milestone 4's drop, between dropping
    ``ml_candidates.experiment_id`` and ``ml_experiments`` (a run would have no parent).
    A write that waited for a lock and then finds such a moment has changed stage too."""


def stage_of(conn: Connection) -> Stage:
    """The stage a write in this transaction meets; :class:`WritesPaused` when none."""
    if milestone_state(conn, M4)["state"] == MilestoneState.ROLLING_BACK:
        raise WritesPaused("milestone 4 is being rolled back (its tables rebuilt and checked against "
                           "its archive)")
    source = mlflow_source(conn)
    experiments_live = source in (FROM_EXPERIMENTS, FROM_MODELS)
    if experiments_live and not column_exists(conn, "ml_candidates", "experiment_id"):
        raise WritesPaused("milestone 4 is dropping the experiments' tables")
    if source == FROM_MODELS_AND_ARCHIVE:
        return Stage.ARCHIVE
    if source == FROM_MODELS_AND_IDS:
        return Stage.KEPT_IDS
    if source == FROM_MODELS:
        state = milestone_state(conn, M3)["state"]
        if state in STARTED and state != MilestoneState.ROLLING_BACK:
            return Stage.MODELS
    assert source in (FROM_EXPERIMENTS, FROM_MODELS, None)
    return Stage.EXPERIMENTS


@dataclass(frozen=True)
class WriteContext:
    """What every write endpoint gets besides its parameters: the project (resolved), the
    token's user (None when the server runs without a token source), the stage read in the
    write's transaction, and the URL answers start with."""

    project_id: int
    user_id: int | None
    stage: Stage
    base_url: str
    endpoint: str


@dataclass(frozen=True)
class ExperimentRef:
    """An MLflow experiment as a write needs it: its row id (None once milestone 4 dropped
    the table), its per-project iid (the MLflow ``experiment_id``) and its model, if any."""

    id: int | None
    iid: int
    project_id: int
    model_id: int | None
    name: str
    deleted: bool


class ExperimentNameTaken(sa.exc.IntegrityError):
    """``experiments/create`` of a name the project's MLflow view already has, at a stage
    where no unique index says so (milestone 4 dropped ``ml_experiments``): raised as the
    ``IntegrityError`` the index would have raised before."""

    def __init__(self, project_id: int, name: str):
        super().__init__("experiments/create", {"project_id": project_id, "name": name},
                         Exception(f"an experiment named {name!r} exists in project {project_id}"))


def _where_experiments_live(stage: Stage) -> str:
    """The relation an experiment of this stage is a row of (where the MLflow view reads it)."""
    return {Stage.EXPERIMENTS: "ml_experiments", Stage.MODELS: "ml_experiments",
            Stage.ARCHIVE: M4_ARCHIVE_EXPERIMENTS, Stage.KEPT_IDS: M4_EXPERIMENT_IDS}[stage]


def find_experiment(conn: Connection, stage: Stage, project_id: int, iid: int) -> ExperimentRef | None:
    """The experiment ``iid`` of the project, FOR SHARE where it is a row (a run inserted
    under it cannot lose it to a concurrent delete). After milestone 4 the row is the
    archive's or the kept ids' (:func:`toolkit.verify.fingerprint.experiment_relations`),
    its name the MLflow view's (a created model's display name)."""
    table = _where_experiments_live(stage)
    if stage in (Stage.EXPERIMENTS, Stage.MODELS):
        row = conn.execute(sa.text("""
            SELECT id, iid, project_id, model_id, name, deleted_on IS NOT NULL AS deleted
            FROM ml_experiments WHERE project_id = :p AND iid = :i FOR SHARE"""),
                           {"p": project_id, "i": iid}).one_or_none()
        return ExperimentRef(*row) if row else None
    row = conn.execute(sa.text(f"""
        SELECT x.id, x.iid, x.project_id, x.model_id,
               CASE WHEN l.model_id IS NOT NULL THEN m.display_name ELSE x.name END AS name,
               x.deleted_on IS NOT NULL AS deleted
        FROM {table} x LEFT JOIN ml_models m ON m.id = x.model_id
        LEFT JOIN {M3_CREATED_MODELS} l ON l.model_id = x.model_id
        WHERE x.project_id = :p AND x.iid = :i FOR SHARE OF x"""),
                       {"p": project_id, "i": iid}).one_or_none()
    return ExperimentRef(*row) if row else None


def create_experiment(conn: Connection, stage: Stage, *, project_id: int, name: str,
                      tags: list[tuple[str, str]], user_id: int | None, iid: int) -> ExperimentRef:
    """``experiments/create`` at ``stage``, with the iid already allocated (GitLab's
    ``internal_ids``). Raises ``sqlalchemy.exc.IntegrityError`` on a taken name, and
    :class:`StageChanged` when a schema change committed while it waited for its lock.

    - EXPERIMENTS: the experiment and its tags, as GitLab does;
    - MODELS: the same, then its display-named model made by milestone 3's own batch over
      this one experiment (:func:`~toolkit.milestones.m3_models_for_experiments.create_models_batch`:
      its slug rules, the tags copied, the ledgers with ``run_id`` NULL), so milestone 3's
      rollback removes it as it removes its own and its catch-up finds nothing to do;
    - ARCHIVE, KEPT_IDS: only the model (the same slug, display name and copied tags,
      recorded in the same ledgers), and the MLflow experiment id kept where the view
      reads it (:func:`_keep_experiment_id`); at ARCHIVE the tags in the archived
      ``ml_experiment_metadata`` too, where the view reads them.
    """
    _lock_for(conn, stage, tags=True)  # (the archived tags' ids are serialized by it too)
    if stage in (Stage.EXPERIMENTS, Stage.MODELS):
        row = conn.execute(sa.text("""
            INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, user_id, name)
            VALUES (now(), now(), :iid, :p, :u, :n) RETURNING id"""),
                           {"iid": iid, "p": project_id, "u": user_id, "n": name}).scalar_one()
        for key, value in tags:
            conn.execute(sa.text("""
                INSERT INTO ml_experiment_metadata (created_at, updated_at, experiment_id, name, value,
                                                    project_id)
                VALUES (now(), now(), :e, :k, :v, :p)"""), {"e": row, "k": key, "v": value, "p": project_id})
        model_id = None
        if stage is Stage.MODELS:
            _retrying_slug(conn, lambda: create_models_batch(conn, row - 1, row, None))
            model_id = conn.execute(sa.text("SELECT model_id FROM ml_experiments WHERE id = :e"),
                                    {"e": row}).scalar_one()
        return ExperimentRef(row, iid, project_id, model_id, name, False)
    return _create_model_only(conn, stage, project_id=project_id, name=name, tags=tags,
                              user_id=user_id, iid=iid)


def _lock_for(conn: Connection, stage: Stage, *, tags: bool = False) -> None:
    """Take the lock the write's relation needs, then read the stage again (``tags``: the
    relation of the experiments' tags too, at the archive its metadata table).

    The write takes ROW EXCLUSIVE on ``ml_experiments`` (EXPERIMENTS, MODELS) or SHARE ROW
    EXCLUSIVE on the archive or the kept ids (ARCHIVE, KEPT_IDS: it also serializes the
    allocation of experiment row ids there). Milestone 4's drop (ACCESS EXCLUSIVE on
    ``ml_experiments``), its rollback's rebuild (SHARE on the archive, :mod:`toolkit.milestones.m4.drop`)
    and ``toolkit archive drop`` (ACCESS EXCLUSIVE on the archive) conflict with it: either
    the write commits first and they carry its rows over, or it waits, and finds the stage
    changed (:class:`StageChanged`) instead of writing where nobody reads any more.
    """
    table = _where_experiments_live(stage)
    legacy = stage in (Stage.EXPERIMENTS, Stage.MODELS)
    # (with its tags' table: milestone 4 drops ml_experiment_metadata in a transaction of
    # its own, just before ml_experiments)
    tables = (f"{table}, ml_experiment_metadata" if legacy
              else f"{table}, {M4_ARCHIVE_METADATA}" if tags and stage is Stage.ARCHIVE else table)
    mode = "ROW EXCLUSIVE" if legacy else "SHARE ROW EXCLUSIVE"
    try:
        with conn.begin_nested():
            conn.execute(sa.text(f"LOCK TABLE {tables} IN {mode} MODE"))
    except sa.exc.ProgrammingError as gone:  # dropped while the write waited for it
        raise StageChanged(f"{tables} is gone: the stage is no longer {stage.value}") from gone
    if (now := stage_of(conn)) is not stage:
        raise StageChanged(f"the stage changed from {stage.value} to {now.value}")


def _retrying_slug(conn: Connection, make: Callable[[], object], attempts: int = 5) -> None:
    """Make a model in a savepoint; on a model name taken meanwhile (a concurrent write or
    milestone 3's batch chose the same slug), again, with the names taken now."""
    for attempt in range(attempts):
        try:
            with conn.begin_nested():
                make()
            return
        except sa.exc.IntegrityError as taken:
            diag = getattr(taken.orig, "diag", None)
            if getattr(diag, "table_name", None) != "ml_models" or attempt == attempts - 1:
                raise


def _create_model_only(conn: Connection, stage: Stage, *, project_id: int, name: str,
                       tags: list[tuple[str, str]], user_id: int | None, iid: int) -> ExperimentRef:
    """After milestone 4: the model (slug name, ``display_name`` = the name, the tags as its
    metadata), recorded in milestone 3's ledgers as one it created (``run_id`` NULL: so the
    view shows its display name, ``verify`` counts it among the created models, and once
    milestone 4's rollback has rebuilt the experiment, milestone 3's rollback removes the
    model as it removes its own), and the MLflow experiment id kept."""
    taken_name = conn.execute(sa.text(f"""
        SELECT 1 FROM ({experiments_view(conn, mlflow_source(conn) or FROM_MODELS, "x.project_id = :p")}) e
        WHERE e.name = :n LIMIT 1"""), {"p": project_id, "n": name}).first()
    if taken_name:
        raise ExperimentNameTaken(project_id, name)
    row = _next_experiment_row_id(conn)
    model_id = 0

    def make() -> None:
        nonlocal model_id
        taken = {r[0] for r in conn.execute(sa.text("SELECT name FROM ml_models WHERE project_id = :p"),
                                            {"p": project_id})}
        chosen, _, _ = slug.assign(name, iid, taken)
        model_id = conn.execute(sa.text("""
            INSERT INTO ml_models (created_at, updated_at, project_id, name, user_id, display_name)
            VALUES (now(), now(), :p, :s, :u, :n) RETURNING id"""),
                                {"p": project_id, "s": chosen, "u": user_id, "n": name}).scalar_one()

    _retrying_slug(conn, make)
    conn.execute(sa.text(f"""
        INSERT INTO {M3_CREATED_MODELS} (model_id, experiment_id, project_id, run_id)
        VALUES (:m, :e, :p, NULL)"""), {"m": model_id, "e": row, "p": project_id})
    for key, value in tags:
        conn.execute(sa.text(f"""
            WITH tag AS (
                INSERT INTO ml_model_metadata (created_at, updated_at, model_id, name, value, project_id)
                VALUES (now(), now(), :m, :k, :v, :p) RETURNING id
            )
            INSERT INTO {M3_COPIED_METADATA} (model_metadata_id, model_id, run_id)
            SELECT id, :m, NULL FROM tag"""), {"m": model_id, "k": key, "v": value, "p": project_id})
    _keep_experiment_id(conn, stage, row=row, project_id=project_id, iid=iid, model_id=model_id,
                        name=name, user_id=user_id)
    made = ExperimentRef(row, iid, project_id, model_id, name, False)
    if stage is Stage.ARCHIVE:  # where the reads take the experiment's tags from (and the rollback)
        for key, value in tags:
            _archive_tag(conn, made, key, value)
    return made


def _next_experiment_row_id(conn: Connection) -> int:
    """A row id for an experiment made after milestone 4: past every archived and kept one.
    (The lock of :func:`_lock_for` serializes it. A rollback of milestone 4 sets the rebuilt
    sequence past the archive's ids, so GitLab's next experiment cannot take it.)"""
    sources = [M4_EXPERIMENT_IDS] + ([M4_ARCHIVE_EXPERIMENTS]
                                     if relation_exists(conn, M4_ARCHIVE_EXPERIMENTS) else [])
    highest = " , ".join(f"(SELECT COALESCE(max(id), 0) FROM {t})" for t in sources)
    return conn.execute(sa.text(f"SELECT GREATEST({highest}, 0) + 1")).scalar_one()


def _keep_experiment_id(conn: Connection, stage: Stage, *, row: int, project_id: int, iid: int,
                        model_id: int, name: str, user_id: int | None) -> None:
    """Where the MLflow view reads the experiment: the archive before ``toolkit archive
    drop`` (its rows are what milestone 4's rollback rebuilds ``ml_experiments`` from), and
    the kept ids at either stage (milestone 4 keeps every experiment's id there; the
    archive drop keeps exactly those)."""
    if stage is Stage.ARCHIVE:
        conn.execute(sa.text(f"""
            INSERT INTO {M4_ARCHIVE_EXPERIMENTS} (id, created_at, updated_at, iid, project_id, user_id,
                                                  name, model_id)
            VALUES (:id, now(), now(), :iid, :p, :u, :n, :m)"""),
                     {"id": row, "iid": iid, "p": project_id, "u": user_id, "n": name, "m": model_id})
    conn.execute(sa.text(f"""
        INSERT INTO {M4_EXPERIMENT_IDS} (id, project_id, iid, model_id, name, created_at, updated_at)
        VALUES (:id, :p, :iid, :m, :n, now(), now())"""),
                 {"id": row, "p": project_id, "iid": iid, "m": model_id, "n": name})


def keep_default_experiment(conn: Connection, stage: Stage, *, project_id: int, model_id: int, name: str,
                            user_id: int | None, iid: int) -> int:
    """After milestone 4, ``registered-models/create``'s default experiment
    (``[model]<name>``, GitLab's ``Ml::CreateModelService``) kept as an id only, where the
    view reads experiments, as those of models made before milestone 4 are: so the model's
    runs and versions have an experiment again when milestone 4 is rolled back (its rebuild
    gives each candidate the experiment of its model). Its row id."""
    _lock_for(conn, stage)
    row = _next_experiment_row_id(conn)
    _keep_experiment_id(conn, stage, row=row, project_id=project_id, iid=iid, model_id=model_id, name=name,
                        user_id=user_id)
    return row


def experiments_init_sql(conn: Connection, stage: Stage) -> str:
    """``AtomicInternalId.project_init``'s greatest experiment iid of the project
    (``:project``), wherever the stage keeps experiment iids: after milestone 4 no longer in
    ``ml_experiments`` but in the MLflow view of them."""
    if stage in (Stage.EXPERIMENTS, Stage.MODELS):
        return "SELECT max(iid) FROM ml_experiments WHERE project_id = :project"
    view = experiments_view(conn, mlflow_source(conn) or FROM_MODELS, "x.project_id = :project")
    return f"SELECT max(e.iid) FROM ({view}) e"


def lock_experiments(conn: Connection, stage: Stage) -> None:
    """After milestone 4, what a write to an existing experiment takes before it reads it:
    the lock :func:`create_experiment` takes (SHARE ROW EXCLUSIVE on the archive and its
    metadata table, or on the kept ids), so the write and milestone 4's rollback (SHARE on
    the archive while it rebuilds) or ``toolkit archive drop`` do not interleave; then the
    stage again (:class:`StageChanged`). Nothing to take before milestone 4 (the write's
    ROW EXCLUSIVE on ``ml_experiments`` is enough)."""
    if stage in (Stage.ARCHIVE, Stage.KEPT_IDS):
        _lock_for(conn, stage, tags=True)


def experiment_tag_taken(conn: Connection, stage: Stage, ref: ExperimentRef, key: str) -> bool:
    """Whether the experiment already has the tag ``key`` after milestone 4, where its tags
    are its model's metadata (and, at the archive, the archived ``ml_experiment_metadata``
    rows the reads show): ``Ml::ExperimentMetadata``'s and ``Ml::ModelMetadata``'s
    uniqueness of the name, either way."""
    assert stage in (Stage.ARCHIVE, Stage.KEPT_IDS) and ref.model_id is not None
    taken = conn.execute(sa.text(
        "SELECT EXISTS (SELECT 1 FROM ml_model_metadata WHERE model_id = :m AND name = :k)"),
        {"m": ref.model_id, "k": key}).scalar_one()
    if not taken and stage is Stage.ARCHIVE:
        taken = conn.execute(sa.text(f"""
            SELECT EXISTS (SELECT 1 FROM {M4_ARCHIVE_METADATA} WHERE experiment_id = :e AND name = :k)"""),
                             {"e": ref.id, "k": key}).scalar_one()
    return taken


def add_experiment_tag(conn: Connection, stage: Stage, ref: ExperimentRef, key: str,
                       value: str) -> list[tuple[str, int]]:
    """``experiments/set-experiment-tag`` after milestone 4 (the caller took
    :func:`lock_experiments` and checked :func:`experiment_tag_taken`): the rows written, as
    (table, id).

    - the tag on the experiment's model (``ml_model_metadata``), recorded in milestone 3's
      ledger as a copy of an experiment tag (``run_id`` NULL, as :func:`create_experiment`
      records the tags of an experiment it makes): once milestone 4's rollback has given
      the experiment the tag back, milestone 3's rollback removes the model's copy as it
      removes its own;
    - at the archive, the tag in the archived ``ml_experiment_metadata`` too: the reads
      and ``verify`` read the experiment's tags there, and milestone 4's rollback rebuilds
      ``ml_experiment_metadata`` from it (its row id past every archived one: the lock
      serializes it, and the rollback sets the rebuilt sequence past the archive's ids).
    """
    assert stage in (Stage.ARCHIVE, Stage.KEPT_IDS) and ref.model_id is not None
    project_id = ref.project_id
    written = []
    model_tag = conn.execute(sa.text("""
        INSERT INTO ml_model_metadata (created_at, updated_at, model_id, name, value, project_id)
        VALUES (now(), now(), :m, :k, :v, :p) RETURNING id"""),
        {"m": ref.model_id, "k": key, "v": value, "p": project_id}).scalar_one()
    written.append(("ml_model_metadata", model_tag))
    if relation_exists(conn, M3_COPIED_METADATA):
        conn.execute(sa.text(f"""
            INSERT INTO {M3_COPIED_METADATA} (model_metadata_id, model_id, run_id)
            VALUES (:t, :m, NULL)"""), {"t": model_tag, "m": ref.model_id})
    if stage is Stage.ARCHIVE:
        written.append((M4_ARCHIVE_METADATA, _archive_tag(conn, ref, key, value)))
    return written


def _archive_tag(conn: Connection, ref: ExperimentRef, key: str, value: str) -> int:
    """One archived ``ml_experiment_metadata`` row of ``ref`` (under :func:`_lock_for`'s lock)."""
    return conn.execute(sa.text(f"""
        INSERT INTO {M4_ARCHIVE_METADATA} (id, created_at, updated_at, experiment_id, name, value, project_id)
        SELECT COALESCE(max(id), 0) + 1, now(), now(), :e, :k, :v, :p FROM {M4_ARCHIVE_METADATA}
        RETURNING id"""), {"e": ref.id, "k": key, "v": value, "p": ref.project_id}).scalar_one()


def record_write(conn: Connection, endpoint: str, table: str, row_id: int, action: str, *,
                 candidate_id: int | None = None, model_id: int | None = None) -> None:
    """Record a row an MLflow client wrote through the server, in the write's transaction,
    so ``verify`` tells the application's writes from the migration's. Nothing is recorded
    on a database the toolkit has not touched (there is no baseline to protect)."""
    if conn.execute(sa.text("SELECT to_regclass('toolkit.mlflow_writes') IS NULL")).scalar_one():
        return
    conn.execute(sa.text("""
        INSERT INTO toolkit.mlflow_writes (endpoint, table_name, row_id, action, candidate_id, model_id)
        VALUES (:e, :t, :r, :a, :c, :m)"""),
                 {"e": endpoint, "t": table, "r": row_id, "a": action, "c": candidate_id, "m": model_id})


def candidate_parent(conn: Connection, ref: ExperimentRef) -> dict[str, int | None]:
    """The parent columns of a run inserted under ``ref``: ``experiment_id`` while the
    experiment is a row, and ``model_id`` (the experiment's model) once milestone 2 has
    given ``ml_candidates`` the column; a column the table does not have is left out."""
    columns: dict[str, int | None] = {}
    # after milestone 4, ref.id is the archived or kept row id: the column is gone
    if ref.id is not None and column_exists(conn, "ml_candidates", "experiment_id"):
        columns["experiment_id"] = ref.id
    if column_exists(conn, "ml_candidates", "model_id"):
        columns["model_id"] = ref.model_id
    return columns
