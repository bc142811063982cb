"""GitLab's MLflow experiment writes: ``experiments/create``, ``set-experiment-tag`` and
``delete`` (``lib/api/ml/mlflow/experiments.rb``, ``ExperimentRepository``,
``Ml::DestroyExperimentService``), at each stage of the blueprint.

What creating an experiment makes, and where an experiment's tag goes after milestone 4,
depends on the stage: :mod:`toolkit.mlflow_api.stage_experiments` does that part.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from toolkit.mlflow_api import internal_ids, stage_experiments, stages
from toolkit.mlflow_api.declared import Declared, blank, metadata_validation, validation_failed
from toolkit.mlflow_api.errors import ApiError
from toolkit.mlflow_api.stages import WriteContext
from toolkit.mlflow_api.tracking_rows import add_metadata, find_experiment, record, tag_pairs
from toolkit.mlflow_api.writing import tables_written
from toolkit.names import M4_ARCHIVE_EXPERIMENTS, M4_ARCHIVE_METADATA, M4_EXPERIMENT_IDS

EXPERIMENT_TABLES = ("ml_experiments", "ml_experiment_metadata", "ml_models", "ml_model_metadata")


@tables_written(*EXPERIMENT_TABLES)
def create_experiment(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``experiment_repository.create!(params[:name], params[:tags])``; a taken (or blank)
    name is ``RecordInvalid``, answered ``resource_already_exists!``."""
    declared = Declared(params)
    name = declared.string("name", required=True)
    tags = declared.array("tags")
    declared.string("artifact_location")
    declared.check()
    if blank(name) or conn.execute(sa.text(
            "SELECT EXISTS (SELECT 1 FROM ml_experiments WHERE project_id = :p AND name = :n)"
            if ctx.stage in (stages.Stage.EXPERIMENTS, stages.Stage.MODELS) else "SELECT false"),
            {"p": ctx.project_id, "n": name}).scalar_one():
        raise ApiError(400, body={"error_code": "RESOURCE_ALREADY_EXISTS"})
    pairs = tag_pairs(tags)
    iid = internal_ids.next_experiment_iid(conn, ctx.project_id, stages.experiments_init_sql(conn, ctx.stage))
    try:
        with conn.begin_nested():
            ref = stage_experiments.create_experiment(conn, ctx.stage, project_id=ctx.project_id, name=name,
                                                      tags=pairs, user_id=ctx.user_id, iid=iid)
    except IntegrityError as exc:
        # the name, taken by a write beside this one (or, after milestone 4, in the kept view)
        taken = isinstance(exc, stage_experiments.ExperimentNameTaken)
        if taken or getattr(exc.orig, "sqlstate", None) == "23505":
            raise ApiError(400, body={"error_code": "RESOURCE_ALREADY_EXISTS"}) from None
        raise
    _record_new_experiment(conn, ctx, ref)
    return {"experiment_id": str(ref.iid)}


def _record_new_experiment(conn: Connection, ctx: WriteContext, ref: stages.ExperimentRef) -> None:
    """Every row the new experiment brought, at whatever stage: its row and tags (after
    milestone 4 in the archive, or its kept id), and its model and the model's metadata
    when the stage made one (all new: the name was free)."""
    tables = {stages.Stage.EXPERIMENTS: ("ml_experiments", "ml_experiment_metadata"),
              stages.Stage.MODELS: ("ml_experiments", "ml_experiment_metadata"),
              stages.Stage.ARCHIVE: (M4_ARCHIVE_EXPERIMENTS, M4_ARCHIVE_METADATA),
              stages.Stage.KEPT_IDS: (M4_EXPERIMENT_IDS, None)}[ctx.stage]
    if ref.id is not None:
        experiments, tags = tables
        record(conn, ctx, experiments, [ref.id], "insert", model_id=ref.model_id)
        if tags is not None:
            record(conn, ctx, tags, [r[0] for r in conn.execute(sa.text(
                f"SELECT id FROM {tags} WHERE experiment_id = :e ORDER BY id"), {"e": ref.id})],
                "insert", model_id=ref.model_id)
    if ref.model_id is not None:
        record(conn, ctx, "ml_models", [ref.model_id], "insert", model_id=ref.model_id)
        record(conn, ctx, "ml_model_metadata", [r[0] for r in conn.execute(sa.text(
            "SELECT id FROM ml_model_metadata WHERE model_id = :m ORDER BY id"), {"m": ref.model_id})],
            "insert", model_id=ref.model_id)


def _after_milestone_4(ctx: WriteContext) -> bool:
    return ctx.stage in (stages.Stage.ARCHIVE, stages.Stage.KEPT_IDS)


@tables_written("ml_experiments", "ml_experiment_metadata", "ml_model_metadata")
def set_experiment_tag(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``experiment_repository.add_tag!`` (``experiment.metadata.create!``). After
    milestone 4 the experiment's tags are its model's metadata (and, until ``toolkit
    archive drop``, the archive's rows the reads show): the tag goes there, under the
    same validations (:func:`stage_experiments.add_experiment_tag`)."""
    declared = Declared(params)
    iid = declared.string("experiment_id", required=True)
    key = declared.string("key", required=True)
    value = declared.string("value", required=True)
    declared.check()
    if _after_milestone_4(ctx):
        stages.lock_experiments(conn, ctx.stage)
    experiment = find_experiment(conn, ctx, iid)
    if _after_milestone_4(ctx):
        if experiment.model_id is None:  # milestone 4's gate lets none through
            raise NotImplementedError(ctx.endpoint)
        taken = key is not None and stage_experiments.experiment_tag_taken(conn, ctx.stage, experiment, key)
        errors = metadata_validation(key, value, taken)
        if errors:
            raise validation_failed(*errors)
        for table, row in stage_experiments.add_experiment_tag(conn, ctx.stage, experiment, key, value):
            record(conn, ctx, table, [row], "insert", model_id=experiment.model_id)
        return {}
    assert experiment.id is not None  # its row: milestone 4 (no row) returned above
    add_metadata(conn, ctx, "ml_experiment_metadata", "experiment_id", experiment.id, key, value,
                  model_id=experiment.model_id)
    return {}


@tables_written("ml_experiments", "ml_experiment_metadata", "ml_candidates", "ml_candidate_params",
                "ml_candidate_metrics", "ml_candidate_metadata")
def delete_experiment(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``Ml::DestroyExperimentService``: ``experiment.destroy``, refused for an experiment
    of a model (``stop_destroy``); its runs and tags go with it (ON DELETE CASCADE)."""
    declared = Declared(params)
    iid = declared.string("experiment_id", required=True)
    declared.check()
    if _after_milestone_4(ctx):
        stages.lock_experiments(conn, ctx.stage)
    experiment = find_experiment(conn, ctx, iid)
    if experiment.model_id is not None:
        # after milestone 4 every experiment is its model's (milestone 4's gate): always this
        raise ApiError(400, body={"message": "Cannot delete an experiment associated to a model"})
    if _after_milestone_4(ctx):
        raise NotImplementedError(ctx.endpoint)  # an experiment without a model: none gets past the gate
    assert experiment.id is not None  # its row: milestone 4 (no row) returned above
    candidates = [r[0] for r in conn.execute(sa.text(
        "SELECT id FROM ml_candidates WHERE experiment_id = :e ORDER BY id FOR UPDATE"),
        {"e": experiment.id})]
    tags = [r[0] for r in conn.execute(sa.text(
        "SELECT id FROM ml_experiment_metadata WHERE experiment_id = :e ORDER BY id"), {"e": experiment.id})]
    conn.execute(sa.text("DELETE FROM ml_experiments WHERE id = :e"), {"e": experiment.id})
    record(conn, ctx, "ml_experiments", [experiment.id], "delete")
    record(conn, ctx, "ml_experiment_metadata", tags, "delete")
    for candidate in candidates:
        record(conn, ctx, "ml_candidates", [candidate], "delete", candidate_id=candidate)
    return {}
