"""GitLab's model-registry writes, done as GitLab's services do them, at each stage of the
blueprint.

The endpoints and what they run (commits named in ``docs/mlflow.md``, section "Writes"):

* ``registered-models/create``: ``Ml::CreateModelService``: the model's default
  experiment ``[model]<name>`` (an iid from ``internal_ids``), the model, a metadata row
  per tag. Any failure (a taken name, an invalid one, a duplicate tag) is GitLab's 400
  ``RESOURCE_ALREADY_EXISTS``.
* ``registered-models/update``: ``Ml::UpdateModelService``: the description, also to null
  when none is sent, as GitLab does.
* ``registered-models/delete``: ``Ml::DestroyModelService``: the model's ``ml_model``
  packages marked pending destruction (``Packages::MarkPackagesForDestructionService``),
  then the model, whose versions, metadata, default experiment and candidates go with it
  (the database's ``ON DELETE CASCADE``, as ``model.destroy`` leaves them to it).
* ``model-versions/create``: ``Ml::CreateModelVersionService``: the version (``gitlab.version``
  tag, else the latest version with its major incremented, else ``1.0.0``), its candidate
  (the run named by ``run_id``, else a new one in the model's default experiment), its
  ``ml_model`` package, a metadata row per tag. Errors are 400 ``INVALID_PARAMETER_VALUE``
  whose ``message`` is a list, as GitLab's ServiceResponse carries it.
* ``model-versions/update``: ``Ml::ModelVersions::UpdateModelVersionService``: the
  description; an unknown version is 400 ``UPDATE_FAILED``.

The stages (:class:`toolkit.mlflow_api.stages.Stage`): before milestone 4 a model gets its
default experiment as GitLab makes it; once milestone 4 dropped ``ml_experiments`` a
model is made alone, and a version's candidate gets ``model_id`` and no experiment. The
model's ``display_name`` (once milestone 3 added it) and the candidate's ``model_id``
(once milestone 2 added it) are set here, never left to milestones 2's and 3's transition
triggers: milestone 4 drops those before the experiments' tables, and writes in between
still meet stage MODELS. Every row inserted,
updated or deleted is recorded with :func:`toolkit.mlflow_api.stages.record_write`.

Each function runs inside the caller's transaction and raises
:class:`toolkit.mlflow_api.errors.ApiError` for GitLab's error answers; it leaves nothing
half-done because the caller rolls the transaction back on any error.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists, relation_exists
from toolkit.milestones.slug import MODEL_NAME
from toolkit.mlflow_api import internal_ids, rails
from toolkit.mlflow_api.errors import ApiError, grape_errors, invalid, resource_not_found
from toolkit.mlflow_api.registry import Registry
from toolkit.mlflow_api.stages import (
    Stage,
    WriteContext,
    experiments_init_sql,
    keep_default_experiment,
    record_write,
)
from toolkit.mlflow_api.tracking_writes import random_candidate_name
from toolkit.mlflow_api.views import View
from toolkit.names import M2_COLUMN, M3_COLUMN, M4_ARCHIVE_EXPERIMENTS, M4_ARCHIVE_METADATA, M4_EXPERIMENT_IDS
from toolkit.schema.gitlab import PACKAGE_TYPE_ML_MODEL, PENDING_DESTRUCTION

Write = Callable[[Connection, WriteContext, dict], dict]

EXPERIMENT_PREFIX = "[model]"  # Ml::Model::EXPERIMENT_NAME_PREFIX
INITIAL_VERSION = "1.0.0"  # Ml::INITIAL_VERSION
GITLAB_TAG_PREFIX = "gitlab."  # api_helpers.rb GITLAB_TAG_PREFIX
MODEL_DESCRIPTION_MAX = VERSION_DESCRIPTION_MAX = 10_000
# Gitlab::Regex.semver_regex (and Packages::SemVer.match, which accepts the same strings)
SEMVER = re.compile(
    r"\A(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z", re.ASCII)
INT4_MAX = 2**31 - 1
MAINTAINER = 40  # Gitlab::Access::MAINTAINER  # semver_major/minor/patch are integer columns


# -- GitLab's answers ------------------------------------------------------------------------
def resource_already_exists() -> ApiError:
    """api_helpers.rb ``resource_already_exists!``: 400, no message."""
    return ApiError(400, body={"error_code": "RESOURCE_ALREADY_EXISTS"})


def update_failed() -> ApiError:
    """api_helpers.rb ``update_failed!``: 400, no message."""
    return ApiError(400, body={"error_code": "UPDATE_FAILED"})


def service_error(*messages: str) -> ApiError:
    """``invalid_parameter!(result.message)`` where the service's message is a list of
    error strings: GitLab sends the list as it is."""
    return ApiError(400, body={"error_code": "INVALID_PARAMETER_VALUE", "message": list(messages)})


def invalid_parameter_without_message() -> ApiError:
    """``invalid_parameter!`` with no argument: the message is null."""
    return ApiError(400, body={"error_code": "INVALID_PARAMETER_VALUE", "message": None})


# -- Rails' checks ---------------------------------------------------------------------------
def _blank(value: str | None) -> bool:
    return value is None or rails.blank(value)


def _metadata_errors(tags: list[dict[str, str | None]], name_max: int) -> list[str]:
    """The ``Validation failed: …`` message ``create!`` raises for the first invalid tag
    (ModelMetadata / ModelVersionMetadata: name present, at most ``name_max``, unique per
    owner; value present, at most 5000), or an empty list."""
    seen: set[str] = set()
    for tag in tags:
        name, value = tag["key"], tag["value"]
        errors = []
        if name is not None and len(name) > name_max:
            errors.append(f"Name is too long (maximum is {name_max} characters)")
        if _blank(name):
            errors.append("Name can't be blank")
        elif name in seen:
            errors.append(f"Name '{name}' already taken")
        if value is not None and len(value) > 5000:
            errors.append("Value is too long (maximum is 5000 characters)")
        if _blank(value):
            errors.append("Value can't be blank")
        if errors:
            return ["Validation failed: " + ", ".join(errors)]
        seen.add(name or "")
    return []


def _tags(params: dict[str, Any]) -> list[dict[str, str | None]]:
    """``optional :tags, type: Array``: each entry's ``key`` and ``value`` as GitLab reads
    them (``d[:key]``, ``d[:value]``), as text."""
    raw = params.get("tags")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid("tags")
    tags = []
    for entry in raw:
        if not isinstance(entry, dict):
            # GitLab fails with a 500 here (String#[] with a Symbol); the toolkit says why
            raise grape_errors("tags is invalid (each tag is an object with key and value)")
        tags.append({field: None if entry.get(field) is None else _text(entry[field], "tags")
                     for field in ("key", "value")})
    return tags


def _text(value: Any, name: str) -> str:
    """A value Grape coerces to String (a JSON number or boolean becomes its text)."""
    if isinstance(value, (list, dict)):
        raise invalid(name)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, float) else str(value)
    if not rails.storable(text):
        raise invalid(name)
    return text


def _string(params: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = rails.grape_string(params, name, required=required)
    if value is not None and not rails.storable(value):
        raise invalid(name)
    return value


def is_valid_model_name(name: str | None) -> bool:
    """Ml::Model's name rules: present, at most 255, ``ml_model_name_regex``."""
    return (name is not None and not rails.blank(name) and len(name) <= 255
            and MODEL_NAME.match(name) is not None)


# -- internal ids ----------------------------------------------------------------------------
# -- reading back ----------------------------------------------------------------------------
def _registry(conn: Connection, ctx: WriteContext) -> Registry:
    return Registry(View(conn, str(ctx.project_id), ctx.base_url))


def _find_model(conn: Connection, ctx: WriteContext, name: str | None, *, lock: bool = True) -> sa.Row:
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


def _has_experiments(stage: Stage) -> bool:
    return stage in (Stage.EXPERIMENTS, Stage.MODELS)


# -- registered-models/create ----------------------------------------------------------------
def create_registered_model(conn: Connection, ctx: WriteContext, params: dict) -> dict:
    """POST registered-models/create (``requires :name``)."""
    name = _string(params, "name", required=True)
    description = _string(params, "description")
    tags = _tags(params)
    too_long = description is not None and len(description) > MODEL_DESCRIPTION_MAX
    if not is_valid_model_name(name) or too_long:
        raise resource_already_exists()
    assert name is not None
    if _has_experiments(ctx.stage) and len(EXPERIMENT_PREFIX + name) > 255:
        raise resource_already_exists()  # the default experiment's name is too long
    if _metadata_errors(tags, 250):
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
    return _registry(conn, ctx).registered_model({"name": name})


def _insert_model(conn: Connection, ctx: WriteContext, name: str, description: str | None) -> int:
    """The default experiment (before milestone 4), then the model; raises IntegrityError
    on a taken name (which the checks above let through only under a concurrent twin)."""
    taken = conn.execute(sa.text(
        "SELECT EXISTS (SELECT 1 FROM ml_models WHERE project_id = :p AND name = :n)"),
        {"p": ctx.project_id, "n": name}).scalar_one()
    if taken:
        raise resource_already_exists()
    experiment_id = None
    if _has_experiments(ctx.stage):
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
    name = _string(params, "name")
    description = _string(params, "description")
    model = _find_model(conn, ctx, name)
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
    return _registry(conn, ctx).registered_model({"name": model.name})


# -- registered-models/delete ----------------------------------------------------------------
def delete_registered_model(conn: Connection, ctx: WriteContext, params: dict) -> dict:
    """DELETE registered-models/delete: 404 without a name or model; the model's
    ``ml_model`` packages pending destruction (GitLab's worker removes their files later),
    then the model and everything that cascades from it."""
    name = _string(params, "name")
    model = _find_model(conn, ctx, name)
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
    if not _has_experiments(ctx.stage):
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
    if _has_experiments(stage):
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


# -- model-versions/create -------------------------------------------------------------------
def create_model_version(conn: Connection, ctx: WriteContext, params: dict) -> dict:
    """POST model-versions/create."""
    name = _string(params, "name")
    description = _string(params, "description")
    tags = _tags(params)
    run_id = _string(params, "run_id")
    model = _find_model(conn, ctx, name)  # FOR UPDATE: versions of one model are made one at a time
    custom = None
    for tag in tags:  # api_helpers.rb gitlab_tags / custom_version: the last gitlab.version wins
        if tag["key"] is not None and tag["key"].startswith(GITLAB_TAG_PREFIX) \
                and tag["key"][len(GITLAB_TAG_PREFIX):] == "version":
            custom = tag["value"]
    version = custom if custom is not None else _next_version(conn, model.id)
    parsed = SEMVER.match(version)
    if parsed is None:
        raise service_error("Version must be semantic version")
    major, minor, patch, prerelease = int(parsed[1]), int(parsed[2]), int(parsed[3]), parsed[4]
    if max(major, minor, patch) > INT4_MAX:
        raise service_error("Version must be semantic version",
                            f"(the toolkit: {version!r} does not fit GitLab's integer semver columns)")
    errors = []
    if len(version) > 255:
        errors.append("Version is too long (maximum is 255 characters)")
    if description is not None and len(description) > VERSION_DESCRIPTION_MAX:
        errors.append(f"Description is too long (maximum is {VERSION_DESCRIPTION_MAX} characters)")
    taken = conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM ml_model_versions WHERE project_id = :p "
                                 "AND model_id = :m AND version = :v)"),
                         {"p": ctx.project_id, "m": model.id, "v": version}).scalar_one()
    if taken:
        errors.append("Version has already been taken")
    if errors:
        raise service_error(*errors)
    version_id = conn.execute(sa.text("""
        INSERT INTO ml_model_versions (created_at, updated_at, project_id, model_id, version, description,
                                       semver_major, semver_minor, semver_patch, semver_prerelease)
        VALUES (now(), now(), :p, :m, :v, :d, :ma, :mi, :pa, :pre) RETURNING id"""),
        {"p": ctx.project_id, "m": model.id, "v": version, "d": description, "ma": major, "mi": minor,
         "pa": patch, "pre": prerelease}).scalar_one()
    record_write(conn, ctx.endpoint, "ml_model_versions", version_id, "insert", model_id=model.id)
    package = _version_candidate(conn, ctx, model, version_id, version, run_id)
    if package is None:
        package = _find_or_create_package(conn, ctx, model, version)
    conn.execute(sa.text("UPDATE ml_model_versions SET package_id = :k WHERE id = :v"),
                 {"k": package, "v": version_id})
    metadata_errors = _metadata_errors(tags, 255)
    if metadata_errors:
        raise service_error(*metadata_errors)  # RecordInvalid, rescued by the service
    for tag in tags:
        row = conn.execute(sa.text("""
            INSERT INTO ml_model_version_metadata (created_at, updated_at, project_id, model_version_id, name,
                                                   value)
            VALUES (now(), now(), :p, :v, :n, :val) RETURNING id"""),
            {"p": ctx.project_id, "v": version_id, "n": tag["key"], "val": tag["value"]}).scalar_one()
        record_write(conn, ctx.endpoint, "ml_model_version_metadata", row, "insert", model_id=model.id)
    registry = _registry(conn, ctx)
    return {"model_version": registry._version_documents([registry._version(model.name, version)])[0]}


def _next_version(conn: Connection, model_id: int) -> str:
    """Ml::IncrementVersionService on ``model.latest_version`` (``latest_by_model``: the
    highest semver, PostgreSQL's DESC putting NULLs first): the major incremented, the rest
    kept (``2.1.0`` -> ``3.1.0``); ``1.0.0`` for a model without versions."""
    latest = conn.execute(sa.text("""
        SELECT version FROM ml_model_versions WHERE model_id = :m
        ORDER BY semver_major DESC, semver_minor DESC, semver_patch DESC, id DESC LIMIT 1"""),
                          {"m": model_id}).scalar()
    if latest is None:
        return INITIAL_VERSION
    parsed = SEMVER.match(latest)
    if parsed is None:
        # GitLab raises here ("Version must be in a valid SemVer format"): a 500
        raise service_error(f"Version must be semantic version (the latest version, {latest!r}, is not, "
                            "so it cannot be incremented: give one in the gitlab.version tag)")
    return f"{int(parsed[1]) + 1}.{parsed[2]}.{parsed[3]}" + (f"-{parsed[4]}" if parsed[4] else "") \
        + (f"+{parsed[5]}" if parsed[5] else "")


def _version_candidate(conn: Connection, ctx: WriteContext, model: sa.Row, version_id: int, version: str,
                       run_id: str | None) -> int | None:
    """``find_or_create_candidate``: the run ``run_id`` names becomes the version's (its
    package, if any, renamed to the version), else a new run in the model's default
    experiment (after milestone 4: under the model). The package it brings, or None."""
    experiments = _has_experiments(ctx.stage)
    if run_id is not None:
        eid = rails.uuid_cast(run_id)
        parent = ("(SELECT e.model_id FROM ml_experiments e WHERE e.id = c.experiment_id)" if experiments
                  else "c.model_id")
        found = None if eid is None else conn.execute(sa.text(f"""
            SELECT c.id, c.model_version_id, {parent} AS model_id, c.package_id, p.package_type
            FROM ml_candidates c LEFT JOIN packages_packages p ON p.id = c.package_id
            WHERE c.project_id = :p AND c.eid = CAST(:eid AS uuid) FOR UPDATE OF c"""),
                                                  {"p": ctx.project_id, "eid": eid}).one_or_none()
        if found is None:
            raise service_error("Run not found")
        if found.model_version_id is not None:
            raise service_error("Run has already a model version")
        if found.model_id != model.id:
            raise service_error("Run's experiment does not belong to this model")
        conn.execute(sa.text(
            "UPDATE ml_candidates SET model_version_id = :v, updated_at = now() WHERE id = :c"),
            {"v": version_id, "c": found.id})
        record_write(conn, ctx.endpoint, "ml_candidates", found.id, "update", candidate_id=found.id,
                     model_id=model.id)
        if found.package_id is None:
            return None
        if found.package_type != PACKAGE_TYPE_ML_MODEL:
            # ModelVersion#valid_package?: update! raises RecordInvalid, which the service returns
            raise service_error("Validation failed: Package package must be ml_model")
        conn.execute(sa.text("UPDATE packages_packages SET name = :n, version = :v, updated_at = now() "
                             "WHERE id = :k"), {"n": model.name, "v": version, "k": found.package_id})
        record_write(conn, ctx.endpoint, "packages_packages", found.package_id, "update",
                     candidate_id=found.id, model_id=model.id)
        return int(found.package_id)
    columns: dict[str, Any] = {"project_id": ctx.project_id, "eid": str(uuid.uuid4()),
                               "internal_id": internal_ids.next_candidate_iid(conn, ctx.project_id),
                               "name": random_candidate_name(), "start_time": 0, "status": 0,
                               "model_version_id": version_id}
    if experiments:
        # ``has_one :default_experiment``: the experiment whose model_id is the model's
        experiment = conn.execute(sa.text(
            "SELECT id FROM ml_experiments WHERE model_id = :m ORDER BY id LIMIT 1"),
            {"m": model.id}).scalar()
        if experiment is None:
            # GitLab fails here with a 500 (a nil default_experiment); the toolkit says why
            raise service_error(f"Model {model.name!r} has no default experiment to hold the version's run")
        columns["experiment_id"] = experiment
    if column_exists(conn, *M2_COLUMN):
        # set here, not left to milestone 2's trigger, which milestone 4 drops before the
        # experiment column (writes in between are still at stage MODELS)
        columns["model_id"] = model.id
    candidate = conn.execute(sa.text(f"""
        INSERT INTO ml_candidates (created_at, updated_at, {", ".join(columns)})
        VALUES (now(), now(), {", ".join(f":{c}" for c in columns)}) RETURNING id"""), columns).scalar_one()
    record_write(conn, ctx.endpoint, "ml_candidates", candidate, "insert", candidate_id=candidate,
                 model_id=model.id)
    return None


def _find_or_create_package(conn: Connection, ctx: WriteContext, model: sa.Row, version: str) -> int:
    """Packages::MlModel::FindOrCreatePackageService: the project's ``ml_model`` package of
    that name and version not pending destruction, else a new one by the token's user."""
    found = conn.execute(sa.text("""
        SELECT id FROM packages_packages
        WHERE project_id = :p AND package_type = :t AND name = :n AND version = :v AND status <> :pending
        ORDER BY id LIMIT 1"""), {"p": ctx.project_id, "t": PACKAGE_TYPE_ML_MODEL, "n": model.name,
                                  "v": version, "pending": PENDING_DESTRUCTION}).scalar()
    if found is not None:
        return int(found)
    package = conn.execute(sa.text("""
        INSERT INTO packages_packages (created_at, updated_at, project_id, name, version, package_type,
                                       creator_id, status)
        VALUES (now(), now(), :p, :n, :v, :t, :u, 0) RETURNING id"""),
        {"p": ctx.project_id, "n": model.name, "v": version, "t": PACKAGE_TYPE_ML_MODEL,
         "u": ctx.user_id}).scalar_one()
    record_write(conn, ctx.endpoint, "packages_packages", package, "insert", model_id=model.id)
    return int(package)


# -- model-versions/update -------------------------------------------------------------------
def update_model_version(conn: Connection, ctx: WriteContext, params: dict) -> dict:
    """PATCH model-versions/update: ``invalid_parameter!`` (no message) unless name,
    version and description are all given (an empty description counts: Ruby's "" is
    true); an unknown version, or a description over 10,000 characters, is
    ``update_failed!``."""
    name = _string(params, "name")
    version = _string(params, "version")
    description = _string(params, "description")
    if name is None or version is None or description is None:
        raise invalid_parameter_without_message()
    found = conn.execute(sa.text("""
        SELECT v.id, v.model_id, v.description FROM ml_model_versions v JOIN ml_models m ON m.id = v.model_id
        WHERE m.name = :n AND m.project_id = :p AND v.project_id = :p AND v.version = :v
        FOR UPDATE OF v"""), {"n": name, "p": ctx.project_id, "v": version}).one_or_none()
    if found is None or len(description) > VERSION_DESCRIPTION_MAX:
        raise update_failed()
    if found.description != description:
        conn.execute(sa.text("""
            UPDATE ml_model_versions SET description = :d, description_html = NULL,
                                         cached_markdown_version = NULL, updated_at = now()
            WHERE id = :v"""), {"d": description, "v": found.id})
        record_write(conn, ctx.endpoint, "ml_model_versions", found.id, "update", model_id=found.model_id)
    registry = _registry(conn, ctx)
    return {"model_version": registry._version_documents([registry._version(name, version)])[0]}


# The parameters GitLab declares for these routes (registered_models.rb, model_versions.rb),
# with their Grape types, for the access log's names as ``inputs.DECLARED`` has the reads'.
DECLARED: dict[str, dict[str, type]] = {
    "registered-models/create": {"name": str, "description": str, "tags": list},
    "registered-models/update": {"name": str, "description": str},
    "registered-models/delete": {"name": str},
    "model-versions/create": {"name": str, "description": str, "tags": list, "run_id": str},
    "model-versions/update": {"name": str, "version": str, "description": str},
}

WRITES: dict[str, Write] = {
    "registered-models/create": create_registered_model,
    "registered-models/update": update_registered_model,
    "registered-models/delete": delete_registered_model,
    "model-versions/create": create_model_version,
    "model-versions/update": update_model_version,
}
