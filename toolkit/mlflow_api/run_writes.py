"""GitLab's MLflow run writes: ``runs/create``, ``update``, ``delete``, ``log-metric``,
``log-parameter``, ``set-tag`` and ``log-batch`` (``lib/api/ml/mlflow/runs.rb``,
``CandidateRepository``, ``Ml::CreateCandidateService``, ``Ml::DestroyCandidateService``).

A run's parent columns at each stage are :func:`toolkit.mlflow_api.stages.candidate_parent`'s;
``gitlab.*`` tags (``gitlab.CI_JOB_ID``) are handled before the tags are inserted, as
GitLab's ``HandleCandidateGitlabMetadataService`` does.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.mlflow_api import internal_ids, rails, stages
from toolkit.mlflow_api.declared import Declared, blank, length_presence, validation_failed
from toolkit.mlflow_api.errors import ApiError, invalid_parameter
from toolkit.mlflow_api.stages import WriteContext
from toolkit.mlflow_api.tracking_rows import (
    add_metadata,
    find_candidate,
    find_experiment,
    record,
    tag_pairs,
    view_of,
)
from toolkit.mlflow_api.writing import tables_written
from toolkit.schema.gitlab import CANDIDATE_STATUSES

CANDIDATE_STATES = [name.upper() for name in CANDIDATE_STATUSES]  # Ml::Candidate.statuses, upcased


GITLAB_TAG_PREFIX = "gitlab."


CI_JOB_ID_TAG = "gitlab.CI_JOB_ID"


RUN_NAME_TAG = "mlflow.runName"


RUN_TABLES = ("ml_experiments", "ml_candidates", "ml_candidate_params", "ml_candidate_metrics",
              "ml_candidate_metadata")


# Ml::CreateCandidateService#random_candidate_name: three FFaker::AnimalUS common names,
# downcased without spaces, and rand(10000), joined with '-'. A list of such names:
ANIMALS = (
    "alligator", "alpaca", "antelope", "armadillo", "badger", "bat", "beaver", "bison", "bobcat",
    "buffalo", "camel", "caribou", "cat", "chipmunk", "cougar", "cow", "coyote", "crow", "deer",
    "dog", "donkey", "dove", "duck", "eagle", "elk", "falcon", "ferret", "fox", "frog", "goat",
    "goose", "hawk", "hedgehog", "horse", "hummingbird", "jackrabbit", "lizard", "llama", "lynx",
    "mink", "moose", "mouse", "mule", "muskrat", "opossum", "otter", "owl", "panther", "pig",
    "porcupine", "prairiedog", "rabbit", "raccoon", "rat", "rattlesnake", "reindeer", "robin",
    "salamander", "sheep", "skunk", "snake", "sparrow", "squirrel", "toad", "turkey", "turtle",
    "vulture", "walrus", "weasel", "wolf", "woodchuck", "woodpecker", "yak",
)


def random_candidate_name(rng: random.Random | None = None) -> str:
    rng = rng or random.SystemRandom()
    return "-".join([*(rng.choice(ANIMALS) for _ in range(3)), str(rng.randrange(10000))])[:255]


@tables_written(*RUN_TABLES)
def create_run(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``candidate_repository.create!(experiment, start_time, tags, run_name)``: the name
    is ``run_name``, else the ``mlflow.runName`` tag, else a generated one
    (``CreateCandidateService``); the tags are inserted after (``gitlab.*`` ones handled
    first); the answer is the run as ``runs/get`` gives it."""
    declared = Declared(params)
    experiment_id = declared.integer("experiment_id", required=True)
    start_time = declared.integer("start_time", default=0)
    declared.string("user_id")
    tags = declared.array("tags")
    run_name = declared.string("run_name")
    declared.check()
    experiment = find_experiment(conn, ctx, experiment_id)
    pairs = tag_pairs(tags)
    name = (run_name if run_name is not None and not rails.blank(run_name)
            else _tag_value(tags, RUN_NAME_TAG))
    if name is None or rails.blank(name):
        name = random_candidate_name()
    eid = str(uuid.uuid4())
    internal_id = internal_ids.next_candidate_iid(conn, ctx.project_id)
    parent = stages.candidate_parent(conn, experiment)
    ci_build = _ci_build(conn, pairs)
    columns = {**parent, "user_id": ctx.user_id, "start_time": start_time or 0, "name": name, "eid": eid,
               "project_id": ctx.project_id, "internal_id": internal_id, "ci_build_id": ci_build}
    names = ", ".join(columns)
    values = ", ".join(f":{c}" for c in columns)
    candidate = conn.execute(sa.text(f"""
        INSERT INTO ml_candidates (created_at, updated_at, status, {names})
        VALUES (now(), now(), 0, {values}) RETURNING id"""), columns).scalar_one()
    record(conn, ctx, "ml_candidates", [candidate], "insert", candidate_id=candidate,
            model_id=parent.get("model_id"))
    _insert_tags(conn, ctx, candidate, pairs)
    return view_of(conn, ctx).get_run({"run_id": eid})


def _tag_value(tags: list[Any] | None, key: str) -> str | None:
    """``tags&.detect { |t| t[:key] == key }&.dig(:value)``."""
    for tag in tags or []:
        if isinstance(tag, dict) and tag.get("key") == key:
            value = tag.get("value")
            return None if value is None else str(value)
    return None


def _ci_build(conn: Connection, pairs: list[tuple[str, str]]) -> int | None:
    """``HandleCandidateGitlabMetadataService``: ``gitlab.CI_JOB_ID`` names the run's CI
    build, which must exist (``Ci::Build``, the table ``p_ci_builds``, ``ci_builds`` on
    older GitLabs). GitLab raises ArgumentError (its generic 500, the candidate already
    saved); the server answers 400 with GitLab's message and writes nothing."""
    job = dict(pairs).get(CI_JOB_ID_TAG)
    if job is None:
        return None
    number = rails.integer_cast(job)
    found = None
    table = conn.execute(sa.text(
        "SELECT COALESCE(to_regclass('p_ci_builds'), to_regclass('ci_builds'))::text")).scalar()
    if table is not None and number is not None:
        found = conn.execute(sa.text(f"SELECT id FROM {table} WHERE id = :i"), {"i": number}).scalar()
    if found is None:
        raise invalid_parameter("gitlab.CI_JOB_ID must refer to an existing build")
    return int(found)


def _insert_tags(conn: Connection, ctx: WriteContext, candidate: int, pairs: list[tuple[str, str]]) -> None:
    """``add_tags``: ``insert_all`` (ON CONFLICT DO NOTHING on the unique (candidate, name))."""
    for key, value in pairs:
        row = conn.execute(sa.text("""
            INSERT INTO ml_candidate_metadata (created_at, updated_at, candidate_id, name, value, project_id)
            VALUES (now(), now(), :c, :k, :v, :p) ON CONFLICT DO NOTHING RETURNING id"""),
            {"c": candidate, "k": key, "v": value, "p": ctx.project_id}).scalar_one_or_none()
        if row is not None:
            record(conn, ctx, "ml_candidate_metadata", [row], "insert", candidate_id=candidate)


@tables_written("ml_candidates")
def update_run(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``candidate_repository.update(candidate, status, end_time)``; the answer is
    ``UpdateRun``: ``{"run_info": …}``."""
    declared = Declared(params)
    declared.string("run_id", required=True)
    status = declared.string("status", values=CANDIDATE_STATES)
    end_time = declared.integer("end_time")
    declared.check()
    candidate = find_candidate(conn, ctx, params, for_update=True)
    # ActiveRecord's save writes (and bumps updated_at) only when a value changes
    changed = conn.execute(sa.text("""
        UPDATE ml_candidates SET status = COALESCE(:s, status), end_time = COALESCE(:e, end_time),
                                 updated_at = now()
        WHERE id = :c AND (status IS DISTINCT FROM COALESCE(:s, status)
                           OR end_time IS DISTINCT FROM COALESCE(:e, end_time))
        RETURNING id"""),
        {"s": CANDIDATE_STATUSES[status.lower()] if status else None, "e": end_time,
         "c": candidate.id}).scalar_one_or_none()
    if changed is not None:
        record(conn, ctx, "ml_candidates", [candidate.id], "update", candidate_id=candidate.id)
    run = view_of(conn, ctx).get_run({"run_id": str(candidate.eid)})
    return {"run_info": run["run"]["info"]}


@tables_written(*RUN_TABLES[1:])
def delete_run(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``Ml::DestroyCandidateService``: ``candidate.destroy``, refused for the candidate of
    a model version (``check_model_version``); params, metrics and tags go with it."""
    declared = Declared(params)
    declared.string("run_id", required=True)
    declared.check()
    candidate = find_candidate(conn, ctx, params, for_update=True)
    if candidate.model_version_id is not None:
        raise ApiError(400, body={"message": "Cannot delete a candidate associated to a model version"})
    conn.execute(sa.text("DELETE FROM ml_candidates WHERE id = :c"), {"c": candidate.id})
    record(conn, ctx, "ml_candidates", [candidate.id], "delete", candidate_id=candidate.id)
    return {}


@tables_written("ml_candidates", "ml_candidate_metrics")
def log_metric(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``candidate.metrics.create!`` (name: length 250, presence)."""
    declared = Declared(params)
    declared.string("run_id", required=True)
    key = declared.string("key", required=True)
    value = declared.float("value", required=True)
    timestamp = declared.integer("timestamp", required=True)
    step = declared.integer("step")
    declared.check()
    candidate = find_candidate(conn, ctx, params)
    errors: list[str] = []
    length_presence(errors, "Name", key, 250)
    if blank(key):
        errors.append("Name can't be blank")
    if errors:
        raise validation_failed(*errors)
    row = _insert_metrics(conn, ctx, candidate.id, [(key, value, timestamp, step)])
    record(conn, ctx, "ml_candidate_metrics", row, "insert", candidate_id=candidate.id)
    return {}


def _insert_metrics(conn: Connection, ctx: WriteContext, candidate: int,
                    metrics: list[tuple[Any, float | None, int | None, int | None]]) -> list[int]:
    if not metrics:
        return []
    rows = conn.execute(sa.text("""
        INSERT INTO ml_candidate_metrics (created_at, updated_at, candidate_id, name, value, tracked_at, step,
                                          project_id)
        SELECT now(), now(), :c, m.name, m.value, m.tracked_at, m.step, :p
        FROM unnest(CAST(:names AS text[]), CAST(:values AS double precision[]), CAST(:tracked AS bigint[]),
                    CAST(:steps AS bigint[])) WITH ORDINALITY AS m(name, value, tracked_at, step, n)
        ORDER BY m.n RETURNING id"""),
        {"c": candidate, "p": ctx.project_id, "names": [m[0] for m in metrics],
         "values": [m[1] for m in metrics], "tracked": [m[2] for m in metrics],
         "steps": [m[3] for m in metrics]})
    return [r[0] for r in rows]


@tables_written("ml_candidates", "ml_candidate_params")
def log_parameter(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``candidate.params.create!``: a key logged before is ``Validation failed: Name has
    already been taken`` (``Ml::CandidateParam``: name unique per candidate; name and value
    at most 250 characters, present)."""
    declared = Declared(params)
    declared.string("run_id", required=True)
    key = declared.string("key", required=True)
    value = declared.string("value", required=True)
    declared.check()
    candidate = find_candidate(conn, ctx, params)
    errors: list[str] = []
    if key is not None and conn.execute(sa.text(
            "SELECT EXISTS (SELECT 1 FROM ml_candidate_params WHERE candidate_id = :c AND name = :k)"),
            {"c": candidate.id, "k": key}).scalar_one():
        errors.append("Name has already been taken")
    length_presence(errors, "Name", key, 250)
    length_presence(errors, "Value", value, 250)
    if blank(key):
        errors.append("Name can't be blank")
    if blank(value):
        errors.append("Value can't be blank")
    if errors:
        raise validation_failed(*errors)
    row = conn.execute(sa.text("""
        INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value, project_id)
        VALUES (now(), now(), :c, :k, :v, :p) RETURNING id"""),
        {"c": candidate.id, "k": key, "v": value, "p": ctx.project_id}).scalar_one()
    record(conn, ctx, "ml_candidate_params", [row], "insert", candidate_id=candidate.id)
    return {}


@tables_written("ml_candidates", "ml_candidate_metadata")
def set_tag(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``candidate_repository.add_tag!``: ``gitlab.*`` tags handled, then
    ``candidate.metadata.create!`` (a key set before: ``Name '<key>' already taken``)."""
    declared = Declared(params)
    declared.string("run_id", required=True)
    key = declared.string("key", required=True)
    value = declared.string("value", required=True)
    declared.check()
    candidate = find_candidate(conn, ctx, params, for_update=True)
    if key is not None and key.startswith(GITLAB_TAG_PREFIX) and value is not None:
        _set_ci_build(conn, ctx, candidate.id, [(key, value)])
    add_metadata(conn, ctx, "ml_candidate_metadata", "candidate_id", candidate.id, key, value,
                  candidate_id=candidate.id)
    return {}


def _set_ci_build(conn: Connection, ctx: WriteContext, candidate: int, pairs: list[tuple[str, str]]) -> None:
    build = _ci_build(conn, pairs)
    if build is not None:
        conn.execute(sa.text("UPDATE ml_candidates SET ci_build_id = :b, updated_at = now() WHERE id = :c"),
                     {"b": build, "c": candidate})
        record(conn, ctx, "ml_candidates", [candidate], "update", candidate_id=candidate)


@tables_written("ml_candidates", "ml_candidate_metrics", "ml_candidate_params", "ml_candidate_metadata")
def log_batch(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``add_metrics``, ``add_params``, ``add_tags``: each an ``insert_all``, which skips a
    row its unique index already has (a param or tag key logged before, or twice in the
    batch: the first is kept); metrics are all inserted. On GitLab the three inserts are
    separate statements (a failing one leaves the earlier ones written); here the batch is
    one transaction."""
    declared = Declared(params)
    declared.string("run_id", required=True)
    metrics = declared.array("metrics", default=[]) or []
    read_metrics = []
    for item in declared.items("metrics", metrics):
        read_metrics.append((item.string("key", required=True), item.float("value", required=True),
                             item.integer("timestamp", required=True), item.integer("step")))
    given = declared.array("params", default=[]) or []
    read_params = [(item.string("key", required=True), item.string("value", required=True))
                   for item in declared.items("params", given)]
    declared.check()
    tags = params.get("tags")
    candidate = find_candidate(conn, ctx, params, for_update=bool(tags))
    metric_rows = _insert_metrics(conn, ctx, candidate.id, read_metrics)
    record(conn, ctx, "ml_candidate_metrics", metric_rows, "insert", candidate_id=candidate.id)
    for key, value in read_params:
        row = conn.execute(sa.text("""
            INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value, project_id)
            VALUES (now(), now(), :c, :k, :v, :p) ON CONFLICT DO NOTHING RETURNING id"""),
            {"c": candidate.id, "k": key, "v": value, "p": ctx.project_id}).scalar_one_or_none()
        if row is not None:
            record(conn, ctx, "ml_candidate_params", [row], "insert", candidate_id=candidate.id)
    if tags:
        pairs = tag_pairs(tags if isinstance(tags, list) else [tags])
        if any(key.startswith(GITLAB_TAG_PREFIX) for key, _ in pairs):
            _set_ci_build(conn, ctx, candidate.id, pairs)
        _insert_tags(conn, ctx, candidate.id, pairs)
    return {}
