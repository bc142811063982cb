"""An MLflow experiment made, or tagged, where the blueprint's stage keeps experiments.

``experiments/create`` makes a GitLab experiment before milestone 3, an experiment and its
display-named model while milestone 3 runs or is done, and after milestone 4 a model alone
whose MLflow experiment id is kept in the toolkit's schema (the archive, then the kept
ids), recorded in milestone 3's ledgers so each rollback removes what it made. After
milestone 4 an experiment's tags are its model's metadata (and the archive's rows). The
stage itself, its locks and the lookups are :mod:`toolkit.mlflow_api.stages`.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import relation_exists
from toolkit.milestones import slug
from toolkit.milestones.m3_create import create_models_batch
from toolkit.mlflow_api.stages import ExperimentRef, Stage, lock_for
from toolkit.names import (
    M3_COPIED_METADATA,
    M3_CREATED_MODELS,
    M4_ARCHIVE_EXPERIMENTS,
    M4_ARCHIVE_METADATA,
    M4_EXPERIMENT_IDS,
)
from toolkit.verify.mlflow_view import (
    FROM_MODELS,
    experiments_view,
    mlflow_source,
)


class ExperimentNameTaken(sa.exc.IntegrityError):
    """``experiments/create`` of a name the project's MLflow view already has, at a stage
    where no unique index says so (milestone 4 dropped ``ml_experiments``): raised as the
    ``IntegrityError`` the index would have raised before."""

    def __init__(self, project_id: int, name: str):
        super().__init__("experiments/create", {"project_id": project_id, "name": name},
                         Exception(f"an experiment named {name!r} exists in project {project_id}"))


def create_experiment(conn: Connection, stage: Stage, *, project_id: int, name: str,
                      tags: list[tuple[str, str]], user_id: int | None, iid: int) -> ExperimentRef:
    """``experiments/create`` at ``stage``, with the iid already allocated (GitLab's
    ``internal_ids``). Raises ``sqlalchemy.exc.IntegrityError`` on a taken name, and
    :class:`StageChanged` when a schema change committed while it waited for its lock.

    - EXPERIMENTS: the experiment and its tags, as GitLab does;
    - MODELS: the same, then its display-named model made by milestone 3's own batch over
      this one experiment (:func:`~toolkit.milestones.m3_create.create_models_batch`:
      its slug rules, the tags copied, the ledgers with ``run_id`` NULL), so milestone 3's
      rollback removes it as it removes its own and its catch-up finds nothing to do;
    - ARCHIVE, KEPT_IDS: only the model (the same slug, display name and copied tags,
      recorded in the same ledgers), and the MLflow experiment id kept where the view
      reads it (:func:`_keep_experiment_id`); at ARCHIVE the tags in the archived
      ``ml_experiment_metadata`` too, where the view reads them.
    """
    lock_for(conn, stage, tags=True)  # (the archived tags' ids are serialized by it too)
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
    (The lock of :func:`lock_for` serializes it. A rollback of milestone 4 sets the rebuilt
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
    lock_for(conn, stage)
    row = _next_experiment_row_id(conn)
    _keep_experiment_id(conn, stage, row=row, project_id=project_id, iid=iid, model_id=model_id, name=name,
                        user_id=user_id)
    return row


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
    """One archived ``ml_experiment_metadata`` row of ``ref`` (under :func:`lock_for`'s lock)."""
    return conn.execute(sa.text(f"""
        INSERT INTO {M4_ARCHIVE_METADATA} (id, created_at, updated_at, experiment_id, name, value, project_id)
        SELECT COALESCE(max(id), 0) + 1, now(), now(), :e, :k, :v, :p FROM {M4_ARCHIVE_METADATA}
        RETURNING id"""), {"e": ref.id, "k": key, "v": value, "p": ref.project_id}).scalar_one()
