"""GitLab's model-version writes: ``model-versions/create`` and ``update``
(``Ml::CreateModelVersionService``, ``Ml::ModelVersions::UpdateModelVersionService``).

A version is a semver (the ``gitlab.version`` tag, else the latest one with its major
incremented), with its candidate (the run named by ``run_id``, else a new one under the
model, with the parent columns of the stage) and its ``ml_model`` package.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists
from toolkit.mlflow_api import internal_ids, rails
from toolkit.mlflow_api.model_writes import find_model, has_experiments, registry_of
from toolkit.mlflow_api.registry_answers import (
    invalid_parameter_without_message,
    metadata_errors,
    read_string,
    read_tags,
    service_error,
    update_failed,
)
from toolkit.mlflow_api.run_writes import random_candidate_name
from toolkit.mlflow_api.stages import (
    WriteContext,
    record_write,
)
from toolkit.names import M2_COLUMN
from toolkit.schema.gitlab import PACKAGE_TYPE_ML_MODEL, PENDING_DESTRUCTION

INITIAL_VERSION = "1.0.0"  # Ml::INITIAL_VERSION


GITLAB_TAG_PREFIX = "gitlab."  # api_helpers.rb GITLAB_TAG_PREFIX


VERSION_DESCRIPTION_MAX = 10_000


# Gitlab::Regex.semver_regex (and Packages::SemVer.match, which accepts the same strings)
SEMVER = re.compile(
    r"\A(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z", re.ASCII)


INT4_MAX = 2**31 - 1  # semver_major/minor/patch are integer columns


# -- model-versions/create -------------------------------------------------------------------
def create_model_version(conn: Connection, ctx: WriteContext, params: dict) -> dict:
    """POST model-versions/create."""
    name = read_string(params, "name")
    description = read_string(params, "description")
    tags = read_tags(params)
    run_id = read_string(params, "run_id")
    model = find_model(conn, ctx, name)  # FOR UPDATE: versions of one model are made one at a time
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
    tag_errors = metadata_errors(tags, 255)
    if tag_errors:
        raise service_error(*tag_errors)  # RecordInvalid, rescued by the service
    for tag in tags:
        row = conn.execute(sa.text("""
            INSERT INTO ml_model_version_metadata (created_at, updated_at, project_id, model_version_id, name,
                                                   value)
            VALUES (now(), now(), :p, :v, :n, :val) RETURNING id"""),
            {"p": ctx.project_id, "v": version_id, "n": tag["key"], "val": tag["value"]}).scalar_one()
        record_write(conn, ctx.endpoint, "ml_model_version_metadata", row, "insert", model_id=model.id)
    registry = registry_of(conn, ctx)
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
    experiments = has_experiments(ctx.stage)
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
    name = read_string(params, "name")
    version = read_string(params, "version")
    description = read_string(params, "description")
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
    registry = registry_of(conn, ctx)
    return {"model_version": registry._version_documents([registry._version(name, version)])[0]}
