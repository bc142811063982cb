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

from dataclasses import dataclass
from enum import Enum

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine.state import ROLLING_BACK, STARTED, milestone_state
from toolkit.verify.fingerprint import (
    FROM_EXPERIMENTS,
    FROM_MODELS,
    FROM_MODELS_AND_ARCHIVE,
    FROM_MODELS_AND_IDS,
    mlflow_source,
)


class Stage(Enum):
    EXPERIMENTS = "experiments"
    MODELS = "experiments with models"
    ARCHIVE = "models, experiment ids in milestone 4's archive"
    KEPT_IDS = "models, experiment ids kept for good"


def stage_of(conn: Connection) -> Stage:
    """The stage a write in this transaction meets."""
    source = mlflow_source(conn)
    if source == FROM_MODELS_AND_ARCHIVE:
        return Stage.ARCHIVE
    if source == FROM_MODELS_AND_IDS:
        return Stage.KEPT_IDS
    if source == FROM_MODELS:
        state = milestone_state(conn, "milestone-3")["state"]
        if state in STARTED and state != ROLLING_BACK:
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


def find_experiment(conn: Connection, stage: Stage, project_id: int, iid: int) -> ExperimentRef | None:
    """The experiment ``iid`` of the project, FOR SHARE where it is a row (a run inserted
    under it cannot lose it to a concurrent delete)."""
    if stage in (Stage.EXPERIMENTS, Stage.MODELS):
        row = conn.execute(sa.text("""
            SELECT id, iid, project_id, model_id, name, deleted_on IS NOT NULL AS deleted
            FROM ml_experiments WHERE project_id = :p AND iid = :i FOR SHARE"""),
                           {"p": project_id, "i": iid}).one_or_none()
        return ExperimentRef(*row) if row else None
    raise NotImplementedError(f"experiments at stage {stage.value}")  # milestone 4's stages


def create_experiment(conn: Connection, stage: Stage, *, project_id: int, name: str,
                      tags: list[tuple[str, str]], user_id: int | None, iid: int) -> ExperimentRef:
    """``experiments/create`` at ``stage``, with the iid already allocated (GitLab's
    ``internal_ids``). Raises ``sqlalchemy.exc.IntegrityError`` on a taken name."""
    if stage is Stage.EXPERIMENTS:
        row = conn.execute(sa.text("""
            INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, user_id, name)
            VALUES (now(), now(), :iid, :p, :u, :n) RETURNING id"""),
                           {"iid": iid, "p": project_id, "u": user_id, "n": name}).scalar_one()
        for key, value in tags:
            conn.execute(sa.text("""
                INSERT INTO ml_experiment_metadata (created_at, updated_at, experiment_id, name, value,
                                                    project_id)
                VALUES (now(), now(), :e, :k, :v, :p)"""), {"e": row, "k": key, "v": value, "p": project_id})
        return ExperimentRef(row, iid, project_id, None, name, False)
    raise NotImplementedError(f"experiments/create at stage {stage.value}")


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
    if ref.id is not None:
        columns["experiment_id"] = ref.id
    has_model_id = conn.execute(sa.text("""
        SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('ml_candidates')
                       AND attname = 'model_id' AND NOT attisdropped)""")).scalar_one()
    if has_model_id:
        columns["model_id"] = ref.model_id
    return columns
