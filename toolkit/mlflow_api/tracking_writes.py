"""GitLab's MLflow tracking writes: experiments create / set-experiment-tag / delete, runs
create / update / delete / log-metric / log-parameter / set-tag / log-batch.

Each function is GitLab's endpoint (``lib/api/ml/mlflow/experiments.rb``, ``runs.rb``) and
what it calls (``Ml::ExperimentTracking::ExperimentRepository``, ``CandidateRepository``,
``Ml::CreateCandidateService``, ``Ml::Destroy*Service``, the models' validations), written
as SQL in the write's transaction (:mod:`toolkit.mlflow_api.writing`); docs/mlflow.md,
"Writes", names each file and commit. Answers are GitLab's, status 200 (GitLab sets 200
for every MLflow call: the client takes 201 as an error):

- Grape's parameter errors, 400 ``{"error": "key is missing, value is invalid"}``;
- a model validation failing (``create!``), GitLab's ``rescue_from
  ActiveRecord::ActiveRecordError``: 400 ``INVALID_PARAMETER_VALUE`` with Rails' message,
  e.g. ``Validation failed: Name has already been taken`` for a param logged twice;
- ``experiments/create`` with a taken name: 400 ``RESOURCE_ALREADY_EXISTS``;
- a run or experiment the project does not have: 404 ``RESOURCE_DOES_NOT_EXIST``.

Where the experiment is and what creating one makes depends on the blueprint's stage;
that lives in :mod:`toolkit.mlflow_api.stages` (``find_experiment``, ``create_experiment``,
``candidate_parent``). iids come from GitLab's ``internal_ids``
(:mod:`toolkit.mlflow_api.internal_ids`). Every row written is recorded
(:func:`stages.record_write`).
"""

from __future__ import annotations

import math
import random
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from toolkit.mlflow_api import internal_ids, rails, stages
from toolkit.mlflow_api.errors import ApiError, grape_errors, invalid_parameter, resource_not_found
from toolkit.mlflow_api.views import View
from toolkit.mlflow_api.writing import WriteFunction, tables_written
from toolkit.names import M4_ARCHIVE_EXPERIMENTS, M4_ARCHIVE_METADATA, M4_EXPERIMENT_IDS
from toolkit.schema.gitlab import CANDIDATE_STATUSES

WriteContext = stages.WriteContext
CANDIDATE_STATES = [name.upper() for name in CANDIDATE_STATUSES]  # Ml::Candidate.statuses, upcased
GITLAB_TAG_PREFIX = "gitlab."
CI_JOB_ID_TAG = "gitlab.CI_JOB_ID"
RUN_NAME_TAG = "mlflow.runName"
EXPERIMENT_TABLES = ("ml_experiments", "ml_experiment_metadata", "ml_models", "ml_model_metadata")
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


# --- Grape's declared parameters -------------------------------------------------------------
class Declared:
    """A request's parameters read as Grape's ``params do … end`` reads them: every
    declared parameter is checked, the failures are answered together, in declaration
    order (``key is missing, value is invalid``)."""

    def __init__(self, params: dict[str, Any], prefix: str = ""):
        self.params = params
        self.prefix = prefix
        self.errors: list[str] = []

    def _name(self, name: str) -> str:
        return f"{self.prefix}[{name}]" if self.prefix else name

    def _present(self, name: str, required: bool) -> bool:
        if name not in self.params:
            if required:
                self.errors.append(f"{self._name(name)} is missing")
            return False
        return self.params[name] is not None

    def string(self, name: str, *, required: bool = False, default: Any = None,
               values: list[str] | None = None) -> Any:
        if not self._present(name, required):
            return default
        value = self.params[name]
        if isinstance(value, (list, dict)):
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        text = ("true" if value else "false") if isinstance(value, bool) else (
            repr(value) if isinstance(value, float) else str(value))
        if values is not None and text not in values:
            self.errors.append(f"{self._name(name)} does not have a valid value")
            return None
        return text

    def integer(self, name: str, *, required: bool = False, default: int | None = None) -> int | None:
        if not self._present(name, required):
            return default
        value = self.params[name]
        if value == "":
            return None
        try:
            number = rails.grape_integer({name: value}, name, 0)
        except ApiError:
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        if not rails.BIGINT_MIN <= number <= rails.BIGINT_MAX:
            self.errors.append(f"{self._name(name)} is invalid")  # beyond the column
            return None
        return number

    def float(self, name: str, *, required: bool = False) -> float | None:
        """``type: Float``: a JSON number, or text Ruby's ``Float()`` reads."""
        if not self._present(name, required):
            return None
        value = self.params[name]
        if isinstance(value, (bool, list, dict)):
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip()
        try:
            number = float(text.replace("_", "")) if text and not text.lower().lstrip("+-").startswith(
                ("nan", "inf")) else None
        except ValueError:
            number = None
        if number is None or math.isnan(number):
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        return number

    def array(self, name: str, *, default: list | None = None) -> list[Any] | None:
        if not self._present(name, False):
            return default
        value = self.params[name]
        if not isinstance(value, list):
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        return value

    def items(self, name: str, values: list[Any]) -> list[Declared]:
        """The hashes of an array parameter declared with a block, each read with its own
        ``name[i]`` prefix into this one's errors."""
        found = []
        for index, value in enumerate(values):
            if not isinstance(value, dict):
                self.errors.append(f"{name}[{index}] is invalid")
                continue
            item = Declared(value, f"{name}[{index}]")
            item.errors = self.errors
            found.append(item)
        return found

    def check(self) -> None:
        if self.errors:
            raise grape_errors(*self.errors)


def validation_failed(*messages: str) -> ApiError:
    """``create!`` failing its validations: RecordInvalid, answered by GitLab's rescue_from."""
    return invalid_parameter("Validation failed: " + ", ".join(messages))


def _length_presence(errors: list[str], label: str, value: str | None, maximum: int) -> None:
    if value is not None and len(value) > maximum:
        errors.append(f"{label} is too long (maximum is {maximum} characters)")


def _blank(value: str | None) -> bool:
    return value is None or rails.blank(value)


# --- lookups ---------------------------------------------------------------------------------
def find_candidate(conn: Connection, ctx: WriteContext, params: dict[str, Any], *,
                   for_update: bool = False) -> sa.Row:
    """``find_candidate!(params[:run_id])``: the project's candidate whose eid it is (Rails
    casts a malformed uuid to nil: no candidate), locked for the write."""
    given = rails.grape_string(params, "run_id", required=True)
    eid = rails.uuid_cast(given) if given else None
    row = None
    if eid is not None:
        row = conn.execute(sa.text(f"""
            SELECT id, project_id, eid, model_version_id FROM ml_candidates
            WHERE project_id = :p AND eid = CAST(:eid AS uuid)
            FOR {'UPDATE' if for_update else 'SHARE'}"""), {"p": ctx.project_id, "eid": eid}).first()
    if row is None:
        raise resource_not_found()
    return row


def find_experiment(conn: Connection, ctx: WriteContext, iid: Any) -> stages.ExperimentRef:
    """``find_experiment!(params[:experiment_id], …)`` (Rails casts the iid as an integer)."""
    number = rails.integer_cast(iid) if iid is not None else None
    found = stages.find_experiment(conn, ctx.stage, ctx.project_id, number) if number is not None else None
    if found is None:
        raise resource_not_found()
    return found


def _view(conn: Connection, ctx: WriteContext) -> View:
    return View(conn, str(ctx.project_id), ctx.base_url)


def _record(conn: Connection, ctx: WriteContext, table: str, row_ids: list[int], action: str, *,
            candidate_id: int | None = None, model_id: int | None = None) -> None:
    for row_id in row_ids:
        stages.record_write(conn, ctx.endpoint, table, row_id, action, candidate_id=candidate_id,
                            model_id=model_id)


# --- experiments ---------------------------------------------------------------------------
@tables_written(*EXPERIMENT_TABLES)
def create_experiment(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``experiment_repository.create!(params[:name], params[:tags])``; a taken (or blank)
    name is ``RecordInvalid``, answered ``resource_already_exists!``."""
    declared = Declared(params)
    name = declared.string("name", required=True)
    tags = declared.array("tags")
    declared.string("artifact_location")
    declared.check()
    if _blank(name) or conn.execute(sa.text(
            "SELECT EXISTS (SELECT 1 FROM ml_experiments WHERE project_id = :p AND name = :n)"
            if ctx.stage in (stages.Stage.EXPERIMENTS, stages.Stage.MODELS) else "SELECT false"),
            {"p": ctx.project_id, "n": name}).scalar_one():
        raise ApiError(400, body={"error_code": "RESOURCE_ALREADY_EXISTS"})
    pairs = _tag_pairs(tags)
    iid = internal_ids.next_experiment_iid(conn, ctx.project_id, stages.experiments_init_sql(conn, ctx.stage))
    try:
        with conn.begin_nested():
            ref = stages.create_experiment(conn, ctx.stage, project_id=ctx.project_id, name=name, tags=pairs,
                                           user_id=ctx.user_id, iid=iid)
    except IntegrityError as exc:
        # the name, taken by a write beside this one (or, after milestone 4, in the kept view)
        if isinstance(exc, stages.ExperimentNameTaken) or getattr(exc.orig, "sqlstate", None) == "23505":
            raise ApiError(400, body={"error_code": "RESOURCE_ALREADY_EXISTS"}) from None
        raise
    _record_new_experiment(conn, ctx, ref)
    return {"experiment_id": str(ref.iid)}


def _tag_pairs(tags: list[Any] | None) -> list[tuple[str, str]]:
    """``add_tags``' rows: ``insert_all`` skips a key already inserted (its unique index),
    so the first of a repeated key is kept. A tag without a value fails as GitLab's
    insert fails (NOT NULL)."""
    pairs: dict[str, str] = {}
    for tag in tags or []:
        if not isinstance(tag, dict):
            raise invalid_parameter("tags must be a list of {key, value}")
        key, value = tag.get("key"), tag.get("value")
        if key is None or value is None or isinstance(key, (list, dict)) or isinstance(value, (list, dict)):
            raise invalid_parameter("null value in a tag: every tag needs a key and a value")
        pairs.setdefault(str(key), str(value))
    return list(pairs.items())


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
        _record(conn, ctx, experiments, [ref.id], "insert", model_id=ref.model_id)
        if tags is not None:
            _record(conn, ctx, tags, [r[0] for r in conn.execute(sa.text(
                f"SELECT id FROM {tags} WHERE experiment_id = :e ORDER BY id"), {"e": ref.id})],
                "insert", model_id=ref.model_id)
    if ref.model_id is not None:
        _record(conn, ctx, "ml_models", [ref.model_id], "insert", model_id=ref.model_id)
        _record(conn, ctx, "ml_model_metadata", [r[0] for r in conn.execute(sa.text(
            "SELECT id FROM ml_model_metadata WHERE model_id = :m ORDER BY id"), {"m": ref.model_id})],
            "insert", model_id=ref.model_id)


def _after_milestone_4(ctx: WriteContext) -> bool:
    return ctx.stage in (stages.Stage.ARCHIVE, stages.Stage.KEPT_IDS)


@tables_written("ml_experiments", "ml_experiment_metadata", "ml_model_metadata")
def set_experiment_tag(conn: Connection, ctx: WriteContext, params: dict[str, Any]) -> dict[str, Any]:
    """``experiment_repository.add_tag!`` (``experiment.metadata.create!``). After
    milestone 4 the experiment's tags are its model's metadata (and, until ``toolkit
    archive drop``, the archive's rows the reads show): the tag goes there, under the
    same validations (:func:`stages.add_experiment_tag`)."""
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
        taken = key is not None and stages.experiment_tag_taken(conn, ctx.stage, experiment, key)
        errors = _metadata_validation(key, value, taken)
        if errors:
            raise validation_failed(*errors)
        for table, row in stages.add_experiment_tag(conn, ctx.stage, experiment, key, value):
            _record(conn, ctx, table, [row], "insert", model_id=experiment.model_id)
        return {}
    assert experiment.id is not None  # its row: milestone 4 (no row) returned above
    _add_metadata(conn, ctx, "ml_experiment_metadata", "experiment_id", experiment.id, key, value,
                  model_id=experiment.model_id)
    return {}


def _add_metadata(conn: Connection, ctx: WriteContext, table: str, parent: str, parent_id: int,
                  key: str | None, value: str | None, **record: int | None) -> None:
    """``metadata.create!`` of an experiment or a run: GitLab's validations (a taken name is
    ``RecordInvalid``), then the row, recorded."""
    errors = _metadata_errors(conn, table, parent, parent_id, key, value)
    if errors:
        raise validation_failed(*errors)
    row = conn.execute(sa.text(f"""
        INSERT INTO {table} (created_at, updated_at, {parent}, name, value, project_id)
        VALUES (now(), now(), :parent, :k, :v, :p) RETURNING id"""),
        {"parent": parent_id, "k": key, "v": value, "p": ctx.project_id}).scalar_one()
    _record(conn, ctx, table, [row], "insert", **record)


def _metadata_errors(conn: Connection, table: str, parent: str, parent_id: int, key: str | None,
                     value: str | None) -> list[str]:
    """``Ml::ExperimentMetadata`` / ``CandidateMetadata`` validations over ``table``."""
    taken = not _blank(key) and conn.execute(sa.text(
        f"SELECT EXISTS (SELECT 1 FROM {table} WHERE {parent} = :id AND name = :k)"),
        {"id": parent_id, "k": key}).scalar_one()
    return _metadata_validation(key, value, taken)


def _metadata_validation(key: str | None, value: str | None, taken: bool) -> list[str]:
    """``Ml::ExperimentMetadata`` / ``CandidateMetadata`` / ``ModelMetadata`` validations,
    in their order: name length 250, presence, uniqueness (``'<name>' already taken``);
    value length 5000, presence."""
    errors: list[str] = []
    _length_presence(errors, "Name", key, 250)
    if _blank(key):
        errors.append("Name can't be blank")
    elif taken:
        errors.append(f"Name '{key}' already taken")
    _length_presence(errors, "Value", value, 5000)
    if _blank(value):
        errors.append("Value can't be blank")
    return errors


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
    _record(conn, ctx, "ml_experiments", [experiment.id], "delete")
    _record(conn, ctx, "ml_experiment_metadata", tags, "delete")
    for candidate in candidates:
        _record(conn, ctx, "ml_candidates", [candidate], "delete", candidate_id=candidate)
    return {}


# --- runs ----------------------------------------------------------------------------------
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
    pairs = _tag_pairs(tags)
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
    _record(conn, ctx, "ml_candidates", [candidate], "insert", candidate_id=candidate,
            model_id=parent.get("model_id"))
    _insert_tags(conn, ctx, candidate, pairs)
    return _view(conn, ctx).get_run({"run_id": eid})


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
            _record(conn, ctx, "ml_candidate_metadata", [row], "insert", candidate_id=candidate)


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
        _record(conn, ctx, "ml_candidates", [candidate.id], "update", candidate_id=candidate.id)
    run = _view(conn, ctx).get_run({"run_id": str(candidate.eid)})
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
    _record(conn, ctx, "ml_candidates", [candidate.id], "delete", candidate_id=candidate.id)
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
    _length_presence(errors, "Name", key, 250)
    if _blank(key):
        errors.append("Name can't be blank")
    if errors:
        raise validation_failed(*errors)
    row = _insert_metrics(conn, ctx, candidate.id, [(key, value, timestamp, step)])
    _record(conn, ctx, "ml_candidate_metrics", row, "insert", candidate_id=candidate.id)
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
    _length_presence(errors, "Name", key, 250)
    _length_presence(errors, "Value", value, 250)
    if _blank(key):
        errors.append("Name can't be blank")
    if _blank(value):
        errors.append("Value can't be blank")
    if errors:
        raise validation_failed(*errors)
    row = conn.execute(sa.text("""
        INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value, project_id)
        VALUES (now(), now(), :c, :k, :v, :p) RETURNING id"""),
        {"c": candidate.id, "k": key, "v": value, "p": ctx.project_id}).scalar_one()
    _record(conn, ctx, "ml_candidate_params", [row], "insert", candidate_id=candidate.id)
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
    _add_metadata(conn, ctx, "ml_candidate_metadata", "candidate_id", candidate.id, key, value,
                  candidate_id=candidate.id)
    return {}


def _set_ci_build(conn: Connection, ctx: WriteContext, candidate: int, pairs: list[tuple[str, str]]) -> None:
    build = _ci_build(conn, pairs)
    if build is not None:
        conn.execute(sa.text("UPDATE ml_candidates SET ci_build_id = :b, updated_at = now() WHERE id = :c"),
                     {"b": build, "c": candidate})
        _record(conn, ctx, "ml_candidates", [candidate], "update", candidate_id=candidate)


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
    _record(conn, ctx, "ml_candidate_metrics", metric_rows, "insert", candidate_id=candidate.id)
    for key, value in read_params:
        row = conn.execute(sa.text("""
            INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value, project_id)
            VALUES (now(), now(), :c, :k, :v, :p) ON CONFLICT DO NOTHING RETURNING id"""),
            {"c": candidate.id, "k": key, "v": value, "p": ctx.project_id}).scalar_one_or_none()
        if row is not None:
            _record(conn, ctx, "ml_candidate_params", [row], "insert", candidate_id=candidate.id)
    if tags:
        pairs = _tag_pairs(tags if isinstance(tags, list) else [tags])
        if any(key.startswith(GITLAB_TAG_PREFIX) for key, _ in pairs):
            _set_ci_build(conn, ctx, candidate.id, pairs)
        _insert_tags(conn, ctx, candidate.id, pairs)
    return {}


WRITES: dict[str, WriteFunction] = {
    "experiments/create": create_experiment,
    "experiments/set-experiment-tag": set_experiment_tag,
    "experiments/delete": delete_experiment,
    "runs/create": create_run,
    "runs/update": update_run,
    "runs/delete": delete_run,
    "runs/log-metric": log_metric,
    "runs/log-parameter": log_parameter,
    "runs/set-tag": set_tag,
    "runs/log-batch": log_batch,
}
