"""GitLab's registered-model writes: ``registered-models/create``, ``update`` and
``delete`` (``Ml::CreateModelService``, ``Ml::UpdateModelService``,
``Ml::DestroyModelService``), at each stage of the blueprint; and the model lookup the
version writes share.

Before milestone 4 a model gets its default experiment ``[model]<name>`` as GitLab makes
it; after, the model is made alone and its default experiment kept as an id only
(:func:`toolkit.mlflow_api.stage_experiments.keep_default_experiment`). Deleting a model
records every row its ``ON DELETE CASCADE`` takes.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists, relation_exists
from toolkit.mlflow_api import internal_ids
from toolkit.mlflow_api.errors import ApiError, resource_not_found
from toolkit.mlflow_api.registry import Registry
from toolkit.mlflow_api.registry_answers import (
    is_valid_model_name,
    metadata_errors,
    read_string,
    read_tags,
    resource_already_exists,
)
from toolkit.mlflow_api.stage_experiments import keep_default_experiment
from toolkit.mlflow_api.stages import (
    Stage,
    WriteContext,
    experiments_init_sql,
    record_write,
)
from toolkit.mlflow_api.views import View
from toolkit.names import M3_COLUMN, M4_ARCHIVE_EXPERIMENTS, M4_ARCHIVE_METADATA, M4_EXPERIMENT_IDS
from toolkit.schema.gitlab import PACKAGE_TYPE_ML_MODEL, PENDING_DESTRUCTION

EXPERIMENT_PREFIX = "[model]"  # Ml::Model::EXPERIMENT_NAME_PREFIX


MODEL_DESCRIPTION_MAX = 10_000


MAINTAINER = 40  # Gitlab::Access::MAINTAINER


def registry_of(conn: Connection, ctx: WriteContext) -> Registry:
    return Registry(View(conn, str(ctx.project_id), ctx.base_url))


def find_model(conn: Connection, ctx: WriteContext, name: str | None, *, lock: bool = True) -> sa.Row:
    """``find_model``: the project's model of that name (FOR UPDATE: the write changes it
    or what hangs from it), else 404 ``RESOURCE_DOES_NOT_EXIST``."""
    if name is None:
        raise resource_not_found()
    row = conn.execute(sa.text(f"""
        SELECT id, name, description FROM ml_models WHERE project_id = :p AND name = :n
        {'FOR UPDATE' if lock else ''}"""), {"p": ctx.project_id, "n": name}).one_or_none()
    if row is None:
        raise resource_not_found()
    return row


def has_experiments(stage: Stage) -> bool:
    return stage in (Stage.EXPERIMENTS, Stage.MODELS)


# -- registered-models/create ----------------------------------------------------------------
def create_registered_model(conn: Connection, ctx: WriteContext, params: dict) -> dict:
    """POST registered-models/create (``requires :name``)."""
    name = read_string(params, "name", required=True)
    description = read_string(params, "description")
    tags = read_tags(params)
    too_long = description is not None and len(description) > MODEL_DESCRIPTION_MAX
    if not is_valid_model_name(name) or too_long:
        raise resource_already_exists()
    assert name is not None
    if has_experiments(ctx.stage) and len(EXPERIMENT_PREFIX + name) > 255:
        raise resource_already_exists()  # the default experiment's name is too long
    if metadata_errors(tags, 250):
        raise resource_already_exists()  # RecordInvalid, rescued by the route
    try:
        with conn.begin_nested():  # a concurrent twin's unique violation is GitLab's "taken"
            model_id = _insert_model(conn, ctx, name, description)
    except sa.exc.IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) == "23505":
            raise resource_already_exists() from None
        raise
    for tag in tags:
        row = conn.execute(sa.text("""
            INSERT INTO ml_model_metadata (created_at, updated_at, model_id, name, value, project_id)
            VALUES (now(), now(), :m, :n, :v, :p) RETURNING id"""),
                           {"m": model_id, "n": tag["key"], "v": tag["value"],
                            "p": ctx.project_id}).scalar_one()
        record_write(conn, ctx.endpoint, "ml_model_metadata", row, "insert", model_id=model_id)
    return registry_of(conn, ctx).registered_model({"name": name})


def _insert_model(conn: Connection, ctx: WriteContext, name: str, description: str | None) -> int:
    """The default experiment (before milestone 4), then the model; raises IntegrityError
    on a taken name (which the checks above let through only under a concurrent twin)."""
    taken = conn.execute(sa.text(
        "SELECT EXISTS (SELECT 1 FROM ml_models WHERE project_id = :p AND name = :n)"),
        {"p": ctx.project_id, "n": name}).scalar_one()
    if taken:
        raise resource_already_exists()
    experiment_id = None
    if has_experiments(ctx.stage):
        exists = conn.execute(sa.text(
            "SELECT EXISTS (SELECT 1 FROM ml_experiments WHERE project_id = :p AND name = :n)"),
            {"p": ctx.project_id, "n": EXPERIMENT_PREFIX + name}).scalar_one()
        if exists:
            raise resource_already_exists()  # CreateExperimentService: name taken
        iid = internal_ids.next_experiment_iid(conn, ctx.project_id)
        experiment_id = conn.execute(sa.text("""
            INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, user_id, name)
            VALUES (now(), now(), :iid, :p, :u, :n) RETURNING id"""),
            {"iid": iid, "p": ctx.project_id, "u": ctx.user_id, "n": EXPERIMENT_PREFIX + name}).scalar_one()
    columns = {"project_id": ctx.project_id, "name": name, "user_id": ctx.user_id, "description": description}
    if column_exists(conn, *M3_COLUMN):
        # set here, not left to milestone 3's trigger: milestone 4 drops the trigger in a
        # transaction of its own, and a write at stage MODELS can come after that (the
        # column drop that follows can wait for locks for seconds); a model then without
        # display_name would leave milestone 3 unverified and milestone 4's next run refused
        columns["display_name"] = name
    model_id = conn.execute(sa.text(f"""
        INSERT INTO ml_models (created_at, updated_at, {", ".join(columns)})
        VALUES (now(), now(), {", ".join(f":{c}" for c in columns)}) RETURNING id"""), columns).scalar_one()
    if experiment_id is not None:
        conn.execute(sa.text("UPDATE ml_experiments SET model_id = :m WHERE id = :e"),
                     {"m": model_id, "e": experiment_id})
        record_write(conn, ctx.endpoint, "ml_experiments", experiment_id, "insert", model_id=model_id)
    else:  # after milestone 4: the default experiment kept as an id, as the earlier models' are
        iid = internal_ids.next_experiment_iid(conn, ctx.project_id, experiments_init_sql(conn, ctx.stage))
        kept = keep_default_experiment(conn, ctx.stage, project_id=ctx.project_id, model_id=model_id,
                                       name=EXPERIMENT_PREFIX + name, user_id=ctx.user_id, iid=iid)
        record_write(conn, ctx.endpoint, M4_EXPERIMENT_IDS, kept, "insert", model_id=model_id)
        if ctx.stage is Stage.ARCHIVE:
            record_write(conn, ctx.endpoint, M4_ARCHIVE_EXPERIMENTS, kept, "insert", model_id=model_id)
    record_write(conn, ctx.endpoint, "ml_models", model_id, "insert", model_id=model_id)
    return int(model_id)


# -- registered-models/update ----------------------------------------------------------------
def update_registered_model(conn: Connection, ctx: WriteContext, params: dict) -> dict:
    """PATCH registered-models/update: ``update!(description: params[:description])``, so
    a request without one clears it. ``updated_at`` moves only when the description
    changes (ActiveRecord writes nothing otherwise)."""
    name = read_string(params, "name")
    description = read_string(params, "description")
    model = find_model(conn, ctx, name)
    if description is not None and len(description) > MODEL_DESCRIPTION_MAX:
        # update! raises RecordInvalid; entrypoint.rb answers it with invalid_parameter!
        raise ApiError(400, "INVALID_PARAMETER_VALUE", "Validation failed: Description is too long "
                                                       f"(maximum is {MODEL_DESCRIPTION_MAX} characters)")
    if model.description != description:
        # description_html is GitLab's render of the old text: cleared so GitLab renders anew
        conn.execute(sa.text("""
            UPDATE ml_models SET description = :d, description_html = NULL, cached_markdown_version = NULL,
                                 updated_at = now()
            WHERE id = :m"""), {"d": description, "m": model.id})
        record_write(conn, ctx.endpoint, "ml_models", model.id, "update", model_id=model.id)
    return registry_of(conn, ctx).registered_model({"name": model.name})


# -- registered-models/delete ----------------------------------------------------------------
def delete_registered_model(conn: Connection, ctx: WriteContext, params: dict) -> dict:
    """DELETE registered-models/delete: 404 without a name or model; the model's
    ``ml_model`` packages pending destruction (GitLab's worker removes their files later),
    then the model and everything that cascades from it."""
    name = read_string(params, "name")
    model = find_model(conn, ctx, name)
    m = model.id
    if not _may_destroy_packages(conn, ctx, m):
        # MarkPackagesForDestructionService fails (``destroy_package`` is Maintainer's); the
        # route answers render_api_error!('Model could not be deleted', 400)
        raise ApiError(400, body={"message": "Model could not be deleted"})
    packages = conn.execute(sa.text("""
        UPDATE packages_packages SET status = :pending
        WHERE project_id = :p AND package_type = :t AND status <> :pending
          AND id IN (SELECT package_id FROM ml_model_versions WHERE model_id = :m AND package_id IS NOT NULL)
        RETURNING id"""), {"pending": PENDING_DESTRUCTION, "p": ctx.project_id, "t": PACKAGE_TYPE_ML_MODEL,
                           "m": m}).scalars().all()
    for package in packages:
        record_write(conn, ctx.endpoint, "packages_packages", package, "update", model_id=m)
    for table, row_id, candidate in _cascade(conn, ctx.stage, m):
        record_write(conn, ctx.endpoint, table, row_id, "delete", candidate_id=candidate, model_id=m)
    if not has_experiments(ctx.stage):
        _forget_experiment(conn, ctx, m)
    conn.execute(sa.text("DELETE FROM ml_models WHERE id = :m"), {"m": m})
    record_write(conn, ctx.endpoint, "ml_models", m, "delete", model_id=m)
    return {}


def _may_destroy_packages(conn: Connection, ctx: WriteContext, model_id: int) -> bool:
    """``can?(current_user, :destroy_package, package)`` for each of the model's packages:
    ProjectPolicy gives ``destroy_package`` with ``maintainer_access`` (Maintainer, Owner,
    an administrator). A model without packages needs nothing; a server without tokens has
    no user to ask about."""
    if ctx.user_id is None:
        return True
    has_packages = conn.execute(sa.text("""
        SELECT EXISTS (SELECT 1 FROM ml_model_versions v JOIN packages_packages p ON p.id = v.package_id
                       WHERE v.model_id = :m AND p.project_id = :p AND p.package_type = :t)"""),
                                {"m": model_id, "p": ctx.project_id, "t": PACKAGE_TYPE_ML_MODEL}).scalar_one()
    if not has_packages:
        return True
    return bool(conn.execute(sa.text("""
        SELECT COALESCE(u.admin, false)
               OR COALESCE((SELECT max(a.access_level) FROM project_authorizations a
                            WHERE a.project_id = :p AND a.user_id = u.id), 0) >= :level
        FROM users u WHERE u.id = :u"""),
                             {"p": ctx.project_id, "u": ctx.user_id, "level": MAINTAINER}).scalar())


def _cascade(conn: Connection, stage: Stage, model_id: int) -> list[tuple[str, int, int | None]]:
    """The rows ``DELETE FROM ml_models`` takes with it (every foreign key to it and down
    is ON DELETE CASCADE): (table, id, candidate id)."""
    found: list[tuple[str, int, int | None]] = []

    def rows(table: str, sql: str, candidate: bool = False) -> list[int]:
        got = conn.execute(sa.text(sql), {"m": model_id}).all()
        found.extend((table, r[0], r[1] if candidate else None) for r in got)
        return [r[0] for r in got]

    rows("ml_model_versions", "SELECT id FROM ml_model_versions WHERE model_id = :m")
    rows("ml_model_metadata", "SELECT id FROM ml_model_metadata WHERE model_id = :m")
    rows("ml_model_version_metadata", "SELECT id FROM ml_model_version_metadata WHERE model_version_id IN "
                                      "(SELECT id FROM ml_model_versions WHERE model_id = :m)")
    parents = ["model_version_id IN (SELECT id FROM ml_model_versions WHERE model_id = :m)"]
    if has_experiments(stage):
        experiments = rows("ml_experiments", "SELECT id FROM ml_experiments WHERE model_id = :m")
        if experiments:
            rows("ml_experiment_metadata", "SELECT id FROM ml_experiment_metadata WHERE experiment_id IN "
                                           "(SELECT id FROM ml_experiments WHERE model_id = :m)")
        parents.append("experiment_id IN (SELECT id FROM ml_experiments WHERE model_id = :m)")
    if column_exists(conn, "ml_candidates", "model_id"):
        parents.append("model_id = :m")
    candidates = f"SELECT id FROM ml_candidates WHERE {' OR '.join(parents)}"
    rows("ml_candidates", f"SELECT id, id FROM ml_candidates WHERE {' OR '.join(parents)}", candidate=True)
    for child in ("ml_candidate_params", "ml_candidate_metrics", "ml_candidate_metadata"):
        rows(child, f"SELECT id, candidate_id FROM {child} WHERE candidate_id IN ({candidates})",
             candidate=True)
    return found


def _forget_experiment(conn: Connection, ctx: WriteContext, model_id: int) -> None:
    """After milestone 4 a model can stand for an experiment (its MLflow experiment id kept
    in the toolkit's schema): the model gone, so is the experiment, and the id it kept."""
    for relation in (M4_EXPERIMENT_IDS, M4_ARCHIVE_EXPERIMENTS):
        if not relation_exists(conn, relation):
            continue
        if relation == M4_ARCHIVE_EXPERIMENTS and relation_exists(conn, M4_ARCHIVE_METADATA):
            for row in conn.execute(sa.text(f"""
                    DELETE FROM {M4_ARCHIVE_METADATA} WHERE experiment_id IN
                      (SELECT id FROM {M4_ARCHIVE_EXPERIMENTS} WHERE model_id = :m) RETURNING id"""),
                                    {"m": model_id}).scalars().all():
                record_write(conn, ctx.endpoint, M4_ARCHIVE_METADATA, row, "delete", model_id=model_id)
        for row in conn.execute(sa.text(f"DELETE FROM {relation} WHERE model_id = :m RETURNING id"),
                                {"m": model_id}).scalars().all():
            record_write(conn, ctx.endpoint, relation, row, "delete", model_id=model_id)
