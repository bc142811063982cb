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

What a write makes at each stage (an experiment, its model, the kept id, the tags after
milestone 4) is :mod:`toolkit.mlflow_api.stage_experiments`; this module is the stage,
the lock a write takes before it trusts it, where an experiment is found and a run's
parent columns.

The stage is the fingerprint's MLflow source (:func:`toolkit.verify.mlflow_view.mlflow_source`)
refined by milestone 3's state, so what the server writes is where ``verify`` and the
reads look.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists
from toolkit.engine.results import STARTED, MilestoneState
from toolkit.engine.state import milestone_state
from toolkit.milestones.m3_models_for_experiments import NAME as M3
from toolkit.milestones.m4 import NAME as M4
from toolkit.names import (
    M3_CREATED_MODELS,
    M4_ARCHIVE_EXPERIMENTS,
    M4_ARCHIVE_METADATA,
    M4_EXPERIMENT_IDS,
)
from toolkit.verify.mlflow_view import (
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


def _where_experiments_live(stage: Stage) -> str:
    """The relation an experiment of this stage is a row of (where the MLflow view reads it)."""
    return {Stage.EXPERIMENTS: "ml_experiments", Stage.MODELS: "ml_experiments",
            Stage.ARCHIVE: M4_ARCHIVE_EXPERIMENTS, Stage.KEPT_IDS: M4_EXPERIMENT_IDS}[stage]


def find_experiment(conn: Connection, stage: Stage, project_id: int, iid: int) -> ExperimentRef | None:
    """The experiment ``iid`` of the project, FOR SHARE where it is a row (a run inserted
    under it cannot lose it to a concurrent delete). After milestone 4 the row is the
    archive's or the kept ids' (:func:`toolkit.verify.mlflow_view.experiment_relations`),
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


def lock_for(conn: Connection, stage: Stage, *, tags: bool = False) -> None:
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
    the lock :func:`~toolkit.mlflow_api.stage_experiments.create_experiment` takes (SHARE ROW
    EXCLUSIVE on the archive and its metadata table, or on the kept ids), so the write and
    milestone 4's rollback (SHARE on the archive while it rebuilds) or ``toolkit archive
    drop`` do not interleave; then the stage again (:class:`StageChanged`). Nothing to take
    before milestone 4 (the write's ROW EXCLUSIVE on ``ml_experiments`` is enough)."""
    if stage in (Stage.ARCHIVE, Stage.KEPT_IDS):
        lock_for(conn, stage, tags=True)


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
