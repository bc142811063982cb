"""MLflow writes through ``toolkit mlflow serve --allow-writes``, before any milestone.

The real MLflow client (3.x) logs a training run the way a script does; every write is
read back through the client and found in GitLab's tables as GitLab writes it: iids from
``internal_ids``, the token's user as ``user_id``, each row recorded in
``toolkit.mlflow_writes``. GitLab's answers for duplicates, bad input and access; a write
meeting a schema change (ACCESS EXCLUSIVE held) is 503 with Retry-After and writes nothing,
and the client's own retry gets it through once the lock goes; a killed session is 503 and
the next call works; iids allocated by the server and by GitLab's statement beside it never
collide.

One seeded (adversarial, small) database and one server for the module; the toolkit's own
tables are created first, as any toolkit command that touches the database does.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import Database
from mlflow_serving import MLFLOW2_PYTHON_ENV, adversarial_database, client, raw, said, serve_process, serving
from test_mlflow_tokens import DB_KEY_BASE, PROJECT, SCOPE, UNAUTHORIZED, gitlab_digest

from toolkit.db import create_engine
from toolkit.mlflow_api.internal_ids import ML_CANDIDATES, ML_EXPERIMENTS
from toolkit.mlflow_api.walk import client_version
from toolkit.schema.gitlab import PENDING_DESTRUCTION
from toolkit.schema.migrations import ensure_own_tables

pytestmark = pytest.mark.skipif(client_version() is None,
                                reason="the MLflow client is not installed: pip install -e '.[test]'")
ML_TABLES = ("ml_experiments", "ml_experiment_metadata", "ml_candidates", "ml_candidate_params",
             "ml_candidate_metrics", "ml_candidate_metadata")
LOCK_TIMEOUT_MS = 2000
_names = count()


@pytest.fixture(scope="module")
def db(pg_server, templates) -> Iterator[Database]:
    with adversarial_database(pg_server, templates, "writes", resolved=False) as database:
        with database.engine.connect() as conn:
            ensure_own_tables(conn)
        yield database


@pytest.fixture(scope="module")
def users(db) -> dict[str, int]:
    """A developer, a reporter of PROJECT (the sandbox's project_authorizations)."""
    found = {}
    for role, level in (("developer", 30), ("reporter", 20)):
        found[role] = db.scalar("""SELECT min(a.user_id) FROM project_authorizations a JOIN users u ON u.id = a.user_id
                                   WHERE a.project_id = :p AND a.access_level = :l AND u.state = 'active'""",
                                p=PROJECT, l=level)
    assert all(found.values()), found
    return found


@pytest.fixture(scope="module")
def tokens(db, users, tmp_path_factory) -> dict[str, str]:
    """Personal access tokens as GitLab stores them (tests/test_mlflow_tokens.py's digest)."""
    made = {}
    for name, who, scopes in (("dev_api", "developer", "---\n- api\n"),
                              ("dev_read_api", "developer", "---\n- read_api\n"),
                              ("reporter_api", "reporter", "---\n- api\n")):
        token = f"glpat-writes-{name.replace('_', '-')}"
        db.execute("""INSERT INTO personal_access_tokens (user_id, name, created_at, updated_at, scopes, token_digest)
                      VALUES (:u, :n, now(), now(), :s, :d)""",
                   u=users[who], n=name, s=scopes, d=gitlab_digest(token))
        made[name] = token
    folder = tmp_path_factory.mktemp("writes")
    (folder / "gitlab-secrets.json").write_text(json.dumps({"gitlab_rails": {"db_key_base": DB_KEY_BASE}}))
    made["_secrets"] = str(folder / "gitlab-secrets.json")
    return made


class Server(str):
    """The server's URL; ``log()`` its access log so far."""

    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def server(db, tokens, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("writes-server") / "stderr.txt"
    with serve_process(db, "--allow-writes", "--gitlab-secrets", tokens["_secrets"],
                       "--lock-timeout-ms", str(LOCK_TIMEOUT_MS), stderr=log) as (_, address):
        found = Server(address)
        found.log_path = log
        yield found


def counts(db) -> dict[str, int]:
    return {t: db.scalar(f"SELECT count(*) FROM {t}") for t in (*ML_TABLES, "internal_ids")}


def recorded(db, table: str, row_id: int) -> list[tuple]:
    return [tuple(r) for r in db.rows("""SELECT endpoint, action, candidate_id FROM toolkit.mlflow_writes
                                         WHERE table_name = :t AND row_id = :r ORDER BY id""", t=table, r=row_id)]


def last_value(db, usage: int, project: int = PROJECT) -> int | None:
    return db.scalar("SELECT last_value FROM internal_ids WHERE project_id = :p AND usage = :u", p=project, u=usage)


def run_client(server, tokens, code: str, **env: str) -> list:
    return said(client(server, PROJECT, code, env={"MLFLOW_TRACKING_TOKEN": tokens["dev_api"], **env}))


# --- a training script ------------------------------------------------------------------------
def test_a_training_run_is_written_as_gitlab_writes_it(db, server, tokens, users):
    existing = db.scalar("SELECT name FROM ml_experiments WHERE project_id = :p AND model_id IS NULL "
                         "ORDER BY iid LIMIT 1", p=PROJECT)
    max_iid = db.scalar("SELECT max(iid) FROM ml_experiments WHERE project_id = :p", p=PROJECT)
    max_internal = db.scalar("SELECT max(internal_id) FROM ml_candidates WHERE project_id = :p", p=PROJECT)
    assert last_value(db, ML_EXPERIMENTS) is None  # the counter is made from the greatest iid
    name = "writes: training run é"
    out = run_client(server, tokens, f"""
new = mlflow.set_experiment({name!r})
again = mlflow.set_experiment({name!r})
old = mlflow.set_experiment({existing!r})
say([new.experiment_id, again.experiment_id, old.experiment_id])
mlflow.set_experiment({name!r})
with mlflow.start_run(run_name="first") as run:
    mlflow.log_param("lr", "0.1")
    for step in range(3):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.set_tag("team", "ml")
    c.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric("acc", 0.9, 1700000000000, 2)],
                params=[mlflow.entities.Param("epochs", "3")], tags=[mlflow.entities.RunTag("stage", "dev")])
    rid = run.info.run_id
r = c.get_run(rid)
say([rid, r.info.run_name, r.info.status, r.info.user_id, r.info.experiment_id, r.data.params, r.data.tags.get("team"),
     r.data.tags.get("stage"), r.data.metrics])
say([(m.step, m.value) for m in c.get_metric_history(rid, "loss")])
unnamed = c.create_run(new.experiment_id, tags={{"mlflow.runName": "from-tag"}})
say(c.get_run(unnamed.info.run_id).info.run_name)
c.set_experiment_tag(new.experiment_id, "purpose", "tests")
say(c.get_experiment(new.experiment_id).tags)
doomed = c.create_run(new.experiment_id)
say(doomed.info.run_name)
c.delete_run(doomed.info.run_id)
try:
    c.get_run(doomed.info.run_id)
except MlflowException as exc:
    say(exc.error_code)
""")
    ids, run, history, tagged_name, experiment_tags, generated = out[:6]
    assert out[6] == "RESOURCE_DOES_NOT_EXIST"
    assert ids[0] == ids[1] == str(max_iid + 1) and ids[2] != ids[0]
    rid, run_name, status, user_id, experiment_id, params, team, stage, metrics = run
    assert (run_name, status, user_id, experiment_id) == ("first", "FINISHED", str(users["developer"]), ids[0])
    assert params == {"lr": "0.1", "epochs": "3"} and (team, stage) == ("ml", "dev")
    assert metrics == {"loss": pytest.approx(1 / 3), "acc": 0.9}
    assert history == [[0, 1.0], [1, 0.5], [2, pytest.approx(1 / 3)]]
    assert tagged_name == "from-tag"
    assert experiment_tags == {"purpose": "tests"}
    assert len(generated.split("-")) == 4 and generated.split("-")[3].isdigit()  # GitLab's animal-animal-animal-N

    # the tables, as GitLab would hold them
    experiment = db.rows("SELECT id, iid, user_id FROM ml_experiments WHERE project_id = :p AND name = :n",
                         p=PROJECT, n=name)[0]
    assert (experiment.iid, experiment.user_id) == (max_iid + 1, users["developer"])
    assert last_value(db, ML_EXPERIMENTS) == max_iid + 1
    candidate = db.rows("""SELECT id, internal_id, user_id, status, end_time, name, experiment_id, project_id
                           FROM ml_candidates WHERE eid = CAST(:e AS uuid)""", e=rid)[0]
    assert (candidate.internal_id, candidate.user_id, candidate.status, candidate.experiment_id,
            candidate.project_id) == (max_internal + 1, users["developer"], 2, experiment.id, PROJECT)
    assert candidate.end_time is not None
    # three runs made, one deleted: the counter moved three, gapless
    assert last_value(db, ML_CANDIDATES) == max_internal + 3
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE experiment_id = :e", e=experiment.id) == 2
    params_rows = db.rows("SELECT id, name, value, project_id FROM ml_candidate_params WHERE candidate_id = :c "
                          "ORDER BY name", c=candidate.id)
    assert [(p.name, p.value, p.project_id) for p in params_rows] == [("epochs", "3", PROJECT), ("lr", "0.1", PROJECT)]
    metric_rows = db.rows("SELECT id, name, value, step, tracked_at FROM ml_candidate_metrics WHERE candidate_id = :c "
                          "ORDER BY id", c=candidate.id)
    assert [(m.name, m.step) for m in metric_rows] == [("loss", 0), ("loss", 1), ("loss", 2), ("acc", 2)]
    assert metric_rows[3].tracked_at == 1700000000000

    # every row recorded, with its run
    assert recorded(db, "ml_experiments", experiment.id) == [("experiments/create", "insert", None)]
    assert recorded(db, "ml_candidates", candidate.id) == [("runs/create", "insert", candidate.id),
                                                           ("runs/update", "update", candidate.id)]
    assert recorded(db, "ml_candidate_params", params_rows[1].id) == [("runs/log-parameter", "insert", candidate.id)]
    assert recorded(db, "ml_candidate_params", params_rows[0].id) == [("runs/log-batch", "insert", candidate.id)]
    assert [recorded(db, "ml_candidate_metrics", m.id)[0][0] for m in metric_rows] == \
        ["runs/log-metric"] * 3 + ["runs/log-batch"]
    tag = db.scalar("SELECT id FROM ml_candidate_metadata WHERE candidate_id = :c AND name = 'team'", c=candidate.id)
    assert recorded(db, "ml_candidate_metadata", tag) == [("runs/set-tag", "insert", candidate.id)]
    experiment_tag = db.scalar("SELECT id FROM ml_experiment_metadata WHERE experiment_id = :e", e=experiment.id)
    assert recorded(db, "ml_experiment_metadata", experiment_tag) == [
        ("experiments/set-experiment-tag", "insert", None)]
    assert db.scalar("SELECT count(*) FROM toolkit.mlflow_writes WHERE endpoint = 'runs/delete' AND action = 'delete'"
                     " AND table_name = 'ml_candidates'") == 1


def test_delete_experiment_takes_its_runs_and_is_recorded(db, server, tokens):
    name = f"writes: doomed {next(_names)}"
    experiment_id, run_id = run_client(server, tokens, f"""
e = c.create_experiment({name!r})
r = c.create_run(e)
c.log_param(r.info.run_id, "k", "v")
say([e, r.info.run_id])
""")[0]
    row = db.rows("SELECT id FROM ml_experiments WHERE project_id = :p AND iid = :i", p=PROJECT, i=int(experiment_id))[0]
    candidate = db.scalar("SELECT id FROM ml_candidates WHERE eid = CAST(:e AS uuid)", e=run_id)
    out = run_client(server, tokens, f"""
c.delete_experiment({experiment_id!r})
for call in (lambda: c.get_experiment({experiment_id!r}), lambda: c.get_run({run_id!r})):
    try:
        call()
    except MlflowException as exc:
        say(exc.error_code)
""")
    assert out == ["RESOURCE_DOES_NOT_EXIST"] * 2
    assert db.scalar("SELECT count(*) FROM ml_candidate_params WHERE candidate_id = :c", c=candidate) == 0
    assert recorded(db, "ml_experiments", row.id)[-1] == ("experiments/delete", "delete", None)
    assert recorded(db, "ml_candidates", candidate)[-1] == ("experiments/delete", "delete", candidate)
    # an experiment of a model: GitLab's stop_destroy
    model_experiment = db.scalar("SELECT iid FROM ml_experiments WHERE project_id = :p AND model_id IS NOT NULL "
                                 "LIMIT 1", p=PROJECT)
    assert model_experiment is not None, "the adversarial seed has experiments of models"
    before = counts(db)
    status, document, _ = raw(server, PROJECT, "experiments/delete", body={"experiment_id": str(model_experiment)},
                              token=tokens["dev_api"])
    assert (status, document) == (400, {"message": "Cannot delete an experiment associated to a model"})
    assert counts(db) == before


# --- GitLab's answers -------------------------------------------------------------------------
def _new_run(server, tokens) -> str:
    status, document, _ = raw(server, PROJECT, "experiments/create", body={"name": f"writes: raw {next(_names)}"},
                              token=tokens["dev_api"])
    assert status == 200, document
    status, document, _ = raw(server, PROJECT, "runs/create", body={"experiment_id": document["experiment_id"]},
                              token=tokens["dev_api"])
    assert status == 200, document
    return document["run"]["info"]["run_id"]


def test_duplicates_as_gitlab_answers_them(db, server, tokens):
    run_id = _new_run(server, tokens)
    token = tokens["dev_api"]
    assert raw(server, PROJECT, "runs/log-parameter", body={"run_id": run_id, "key": "p", "value": "1"},
               token=token)[:2] == (200, {})
    before = counts(db)
    assert raw(server, PROJECT, "runs/log-parameter", body={"run_id": run_id, "key": "p", "value": "2"},
               token=token)[:2] == (400, {"error_code": "INVALID_PARAMETER_VALUE",
                                          "message": "Validation failed: Name has already been taken"})
    assert raw(server, PROJECT, "runs/set-tag", body={"run_id": run_id, "key": "t", "value": "1"},
               token=token)[:2] == (200, {})
    assert raw(server, PROJECT, "runs/set-tag", body={"run_id": run_id, "key": "t", "value": "2"},
               token=token)[:2] == (400, {"error_code": "INVALID_PARAMETER_VALUE",
                                          "message": "Validation failed: Name 't' already taken"})
    assert counts(db)["ml_candidate_params"] == before["ml_candidate_params"]
    # log-batch drops duplicates (insert_all skips what the unique index has), keeps the first
    status, document, _ = raw(server, PROJECT, "runs/log-batch", token=token, body={
        "run_id": run_id, "params": [{"key": "p", "value": "3"}, {"key": "q", "value": "first"},
                                     {"key": "q", "value": "second"}],
        "tags": [{"key": "t", "value": "x"}, {"key": "u", "value": "1"}],
        "metrics": [{"key": "m", "value": 1, "timestamp": 5}, {"key": "m", "value": 1, "timestamp": 5}]})
    assert (status, document) == (200, {})
    candidate = db.scalar("SELECT id FROM ml_candidates WHERE eid = CAST(:e AS uuid)", e=run_id)
    assert dict(db.rows("SELECT name, value FROM ml_candidate_params WHERE candidate_id = :c", c=candidate)) == \
        {"p": "1", "q": "first"}
    assert dict(db.rows("SELECT name, value FROM ml_candidate_metadata WHERE candidate_id = :c", c=candidate)) == \
        {"t": "1", "u": "1"}
    assert db.scalar("SELECT count(*) FROM ml_candidate_metrics WHERE candidate_id = :c", c=candidate) == 2
    # runs/update: saved (and recorded) only when a value changes, as ActiveRecord saves
    for _ in range(2):
        status, document, _ = raw(server, PROJECT, "runs/update", token=token,
                                  body={"run_id": run_id, "status": "KILLED", "end_time": 7})
        assert status == 200 and (document["run_info"]["status"], document["run_info"]["end_time"]) == ("KILLED", 7)
    assert [r[0] for r in recorded(db, "ml_candidates", candidate)] == ["runs/create", "runs/update"]
    # a taken experiment name
    name = db.scalar("SELECT name FROM ml_experiments WHERE project_id = :p LIMIT 1", p=PROJECT)
    assert raw(server, PROJECT, "experiments/create", body={"name": name}, token=token)[:2] == \
        (400, {"error_code": "RESOURCE_ALREADY_EXISTS"})


def test_bad_input_is_400_and_writes_nothing(db, server, tokens):
    run_id = _new_run(server, tokens)
    token = tokens["dev_api"]
    before = counts(db)
    cases = [
        ("runs/create", {}, (400, {"error": "experiment_id is missing"})),
        ("runs/create", {"experiment_id": "12abc"}, (400, {"error": "experiment_id is invalid"})),
        ("runs/create", {"experiment_id": 987654}, (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})),
        ("runs/log-metric", {"run_id": "not-a-uuid", "key": "m", "value": 1, "timestamp": 1},
         (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})),
        ("runs/log-metric", {"run_id": run_id, "key": "m", "value": "abc", "timestamp": "x"},
         (400, {"error": "value is invalid, timestamp is invalid"})),
        ("runs/log-metric", {"run_id": run_id}, (400, {"error": "key is missing, value is missing, "
                                                                "timestamp is missing"})),
        ("runs/log-parameter", {"run_id": run_id, "key": "long", "value": "v" * 251},
         (400, {"error_code": "INVALID_PARAMETER_VALUE",
                "message": "Validation failed: Value is too long (maximum is 250 characters)"})),
        ("runs/update", {"run_id": run_id, "status": "DONE"}, (400, {"error": "status does not have a valid value"})),
        ("runs/log-batch", {"run_id": run_id, "metrics": [{"value": 1, "timestamp": 1}]},
         (400, {"error": "metrics[0][key] is missing"})),
        ("experiments/create", {}, (400, {"error": "name is missing"})),
        ("runs/set-tag", {"run_id": run_id, "key": "gitlab.CI_JOB_ID", "value": "999999"},
         (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "gitlab.CI_JOB_ID must refer to an existing build"})),
    ]
    for endpoint, body, expected in cases:
        assert raw(server, PROJECT, endpoint, body=body, token=token)[:2] == expected, (endpoint, body)
    assert counts(db) == before


def test_tokens_and_access_for_writes(db, server, tokens):
    before = counts(db)
    body = {"name": "writes: refused"}
    # read_api is for GET and HEAD only; a reporter lacks write_model_experiments: check_api_write!
    # answers 401 (unauthorized!), as on GitLab
    assert raw(server, PROJECT, "experiments/create", body=body, token=tokens["dev_read_api"])[:2] == (403, SCOPE)
    assert raw(server, PROJECT, "experiments/create", body=body, token=tokens["reporter_api"])[:2] == UNAUTHORIZED
    assert raw(server, PROJECT, "experiments/create", body=body)[:2] == UNAUTHORIZED
    assert counts(db) == before


def test_without_allow_writes_nothing_is_written(db, tokens):
    before = counts(db)
    with serving(db, "--gitlab-secrets", tokens["_secrets"]) as read_only:
        status, document, _ = raw(read_only, PROJECT, "experiments/create", body={"name": "writes: no"},
                                  token=tokens["dev_api"])
        out = said(client(read_only, PROJECT, """
try:
    mlflow.set_experiment("writes: not made")
except MlflowException as exc:
    say([exc.error_code, exc.message])
""", env={"MLFLOW_TRACKING_TOKEN": tokens["dev_api"]}))
    assert status == 403 and document["error_code"] == "FEATURE_DISABLED"
    assert "--allow-writes" in document["message"]
    assert out[0][0] == "FEATURE_DISABLED" and "--allow-writes" in out[0][1]
    assert counts(db) == before


# --- schema changes, lost sessions, concurrent iids --------------------------------------------
class Holder:
    """Another session holding ACCESS EXCLUSIVE on a table, as a milestone's DDL does."""

    def __init__(self, db: Database, table: str):
        self.engine = create_engine(db.url)
        self.conn = self.engine.connect()
        self.conn.execute(sa.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()
        self.engine.dispose()


def test_a_write_during_a_schema_change_is_503_and_the_client_retries(db, server, tokens):
    run_id = _new_run(server, tokens)
    before = counts(db)
    holder = Holder(db, "ml_candidates")
    try:
        started = time.monotonic()
        status, document, headers = raw(server, PROJECT, "runs/log-parameter", token=tokens["dev_api"],
                                        body={"run_id": run_id, "key": "during", "value": "ddl"})
        waited = time.monotonic() - started
    finally:
        holder.release()
    assert waited >= LOCK_TIMEOUT_MS / 1000 * 0.9
    assert status == 503 and document["error_code"] == "TEMPORARILY_UNAVAILABLE", document
    assert int(headers["Retry-After"]) >= 1
    assert counts(db) == before
    # the client's own retry (urllib3, honouring Retry-After) gets through once the lock goes
    refused = server.log().count("/runs/log-parameter 503 ")
    holder = Holder(db, "ml_candidates")
    timer = threading.Timer(5, holder.release)  # after the client's first attempt has timed out
    timer.start()
    try:
        out = run_client(server, tokens, f"""
c.log_param({run_id!r}, "during", "ddl")
say(c.get_run({run_id!r}).data.params)
""", MLFLOW_HTTP_REQUEST_MAX_RETRIES="6", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    finally:
        timer.join()
    assert out == [{"during": "ddl"}]
    assert server.log().count("/runs/log-parameter 503 ") > refused  # answered 503 first, then retried



def test_no_write_while_milestone_4_rolls_back(db, server, tokens):
    """From rebuilding the experiments' tables to checking them against the archive, a
    write would be in neither: 503 at once, naming why, and nothing written; the same write
    goes through once the rollback is over."""
    run_id = _new_run(server, tokens)
    db.execute("INSERT INTO toolkit.milestones (milestone, state) VALUES ('milestone-4', 'rolling_back')")
    before = counts(db)
    try:
        status, document, headers = raw(server, PROJECT, "runs/log-parameter", token=tokens["dev_api"],
                                        body={"run_id": run_id, "key": "paused", "value": "1"})
    finally:
        db.execute("DELETE FROM toolkit.milestones WHERE milestone = 'milestone-4'")
    assert status == 503 and document["error_code"] == "TEMPORARILY_UNAVAILABLE", document
    assert "milestone 4 is being rolled back" in document["message"] and "Retry-After" in headers
    assert counts(db) == before
    status, document, _ = raw(server, PROJECT, "runs/log-parameter", token=tokens["dev_api"],
                              body={"run_id": run_id, "key": "paused", "value": "1"})
    assert status == 200, document


def test_a_queued_schema_change_is_not_overtaken(db, server, tokens):
    """A schema change waiting for ACCESS EXCLUSIVE behind a reader: the write queues
    behind it (PostgreSQL's lock queue) and answers 503 after its lock timeout rather
    than slip in first; nothing is written, and the schema change then gets its lock."""
    run_id = _new_run(server, tokens)
    before = counts(db)
    engine = create_engine(db.url)
    reader, ddl = engine.connect(), engine.connect()
    reader.execute(sa.text("SELECT count(*) FROM ml_candidate_params"))  # ACCESS SHARE, held
    got: dict[str, float] = {}

    def schema_change() -> None:
        ddl.execute(sa.text("SET lock_timeout = '30s'"))
        ddl.execute(sa.text("LOCK TABLE ml_candidate_params IN ACCESS EXCLUSIVE MODE"))
        got["at"] = time.monotonic()
        ddl.rollback()

    waiting = threading.Thread(target=schema_change)
    waiting.start()
    try:
        for _ in range(100):  # the schema change is queued
            if db.scalar("SELECT count(*) FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock' "
                         "AND relation = to_regclass('ml_candidate_params')"):
                break
            time.sleep(0.02)
        status, document, headers = raw(server, PROJECT, "runs/log-parameter", token=tokens["dev_api"],
                                        body={"run_id": run_id, "key": "queued", "value": "v"})
        assert status == 503 and document["error_code"] == "TEMPORARILY_UNAVAILABLE" and "Retry-After" in headers
        assert "at" not in got  # still waiting: the write did not go first
    finally:
        reader.rollback()
        waiting.join(30)
        reader.close()
        ddl.close()
        engine.dispose()
    assert "at" in got
    assert counts(db) == before


def test_a_killed_session_is_503_then_the_next_call_works(db, server, tokens):
    run_id = _new_run(server, tokens)
    holder = Holder(db, "ml_candidate_metrics")
    answer = {}

    def call() -> None:
        answer["result"] = raw(server, PROJECT, "runs/log-metric", token=tokens["dev_api"],
                               body={"run_id": run_id, "key": "m", "value": 1.5, "timestamp": 1})

    worker = threading.Thread(target=call)
    worker.start()
    try:
        killed = False
        for _ in range(100):
            killed = bool(db.scalar("""
                SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE application_name = 'toolkit mlflow serve' AND wait_event_type = 'Lock'"""))
            if killed:
                break
            time.sleep(0.02)
        assert killed
        worker.join(30)
    finally:
        holder.release()
    status, document, headers = answer["result"]
    assert status == 503 and document["error_code"] == "TEMPORARILY_UNAVAILABLE", document
    assert "connection was lost" in document["message"] and "Retry-After" in headers
    candidate = db.scalar("SELECT id FROM ml_candidates WHERE eid = CAST(:e AS uuid)", e=run_id)
    assert db.scalar("SELECT count(*) FROM ml_candidate_metrics WHERE candidate_id = :c", c=candidate) == 0
    assert raw(server, PROJECT, "runs/log-metric", token=tokens["dev_api"],
               body={"run_id": run_id, "key": "m", "value": 1.5, "timestamp": 1})[:2] == (200, {})
    assert db.scalar("SELECT count(*) FROM ml_candidate_metrics WHERE candidate_id = :c", c=candidate) == 1


def test_iids_from_the_server_and_from_gitlab_never_collide(db, server, tokens):
    """GitLab's allocation (InternalId's UPDATE … RETURNING, then its INSERT of an
    experiment with that iid) runs beside the server's experiments/create."""
    raw(server, PROJECT, "experiments/create", body={"name": f"writes: iid {next(_names)}"}, token=tokens["dev_api"])
    engine = create_engine(db.url)
    gitlab_iids: list[int] = []

    def gitlab(n: int) -> None:
        for i in range(n):
            with engine.begin() as conn:
                iid = conn.execute(sa.text("""UPDATE internal_ids SET last_value = last_value + 1
                                              WHERE project_id = :p AND usage = :u RETURNING last_value"""),
                                   {"p": PROJECT, "u": ML_EXPERIMENTS}).scalar_one()
                conn.execute(sa.text("""INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
                                        VALUES (now(), now(), :i, :p, :n)"""),
                             {"i": iid, "p": PROJECT, "n": f"writes: gitlab {iid} {i}"})
                gitlab_iids.append(iid)

    def server_create(i: int) -> str:
        status, document, _ = raw(server, PROJECT, "experiments/create", body={"name": f"writes: server {i}"},
                                  token=tokens["dev_api"])
        assert status == 200, document
        return document["experiment_id"]

    try:
        with ThreadPoolExecutor(4) as pool:
            ours = pool.submit(gitlab, 12)
            server_iids = [int(i) for i in pool.map(server_create, range(12))]
            ours.result()
    finally:
        engine.dispose()
    together = server_iids + gitlab_iids
    assert len(together) == 24 and len(set(together)) == 24
    assert last_value(db, ML_EXPERIMENTS) == db.scalar("SELECT max(iid) FROM ml_experiments WHERE project_id = :p",
                                                       p=PROJECT)


def test_gitlab_ci_job_id_names_the_runs_build(db, server, tokens):
    """``gitlab.CI_JOB_ID`` (HandleCandidateGitlabMetadataService): the run's ``ci_build_id``
    is the build, which must exist (``Ci::Build``: ``p_ci_builds``; a stub of it here)."""
    db.execute("CREATE TABLE IF NOT EXISTS p_ci_builds (id bigint PRIMARY KEY)")
    db.execute("INSERT INTO p_ci_builds (id) VALUES (4242) ON CONFLICT DO NOTHING")
    experiment = raw(server, PROJECT, "experiments/create", body={"name": f"writes: ci {next(_names)}"},
                     token=tokens["dev_api"])[1]["experiment_id"]
    status, document, _ = raw(server, PROJECT, "runs/create", token=tokens["dev_api"], body={
        "experiment_id": experiment, "tags": [{"key": "gitlab.CI_JOB_ID", "value": "4242"}]})
    assert status == 200, document
    run_id = document["run"]["info"]["run_id"]
    assert db.scalar("SELECT ci_build_id FROM ml_candidates WHERE eid = CAST(:e AS uuid)", e=run_id) == 4242
    before = counts(db)
    status, document, _ = raw(server, PROJECT, "runs/create", token=tokens["dev_api"], body={
        "experiment_id": experiment, "tags": [{"key": "gitlab.CI_JOB_ID", "value": "4243"}]})
    assert (status, document) == (400, {"error_code": "INVALID_PARAMETER_VALUE",
                                        "message": "gitlab.CI_JOB_ID must refer to an existing build"})
    assert counts(db) == before  # GitLab saves the run first; here nothing is written


def test_the_client_writes_the_registry_and_reads_it_back(db, server, tokens, users):
    """mlflow 3.x ``MlflowClient``'s registry writes, through HTTP: a model with tags and a
    description, its description updated, a version from a run's source and one from
    elsewhere, a version's description updated, the latest version, the model deleted
    (refused to a Developer while it has packages, GitLab's ``destroy_package``; done by a
    Maintainer). A version's run must be of the model's default experiment (GitLab's rule). Each read back through the client and found in GitLab's tables."""
    name = f"writes-client-model-{next(_names)}"
    maintainer = db.scalar("""SELECT min(a.user_id) FROM project_authorizations a JOIN users u ON u.id = a.user_id
                              WHERE a.project_id = :p AND a.access_level = 40 AND u.state = 'active'
                              AND NOT u.admin""", p=PROJECT)
    assert maintainer is not None
    maintainer_token = f"glpat-writes-maintainer-{next(_names)}"
    db.execute("""INSERT INTO personal_access_tokens (user_id, name, created_at, updated_at, scopes, token_digest)
                  VALUES (:u, 'maintainer', now(), now(), '---\n- api\n', :d)""",
               u=maintainer, d=gitlab_digest(maintainer_token))
    experiment = f"writes: registry runs {next(_names)}"
    out = run_client(server, tokens, f"""
def model(m):
    return [m.name, m.tags, m.description, [v.version for v in (m.latest_versions or [])]]
def version(v):
    return [v.version, list(v.aliases), v.run_id, dict(v.tags), v.description, v.status, v.source]
def refused(call):
    try:
        call()
    except MlflowException as exc:
        return [exc.error_code, exc.message]
say(model(c.create_registered_model({name!r}, tags={{"team": "ml", "stage": "dev"}}, description="first words")))
say(model(c.get_registered_model({name!r})))
say(model(c.update_registered_model({name!r}, description="second words")))
say(model(c.get_registered_model({name!r})))
elsewhere = c.create_run(c.create_experiment({experiment!r})).info.run_id
say(refused(lambda: c.create_model_version({name!r}, source="runs:/" + elsewhere + "/model", run_id=elsewhere)))
run = c.create_run(c.get_experiment_by_name("[model]" + {name!r}).experiment_id)  # the model's own
rid = run.info.run_id
say(rid)
v1 = c.create_model_version({name!r}, source="runs:/" + rid + "/model", run_id=rid, tags={{"k": "v"}},
                            description="from a run")
say(version(v1))
v2 = c.create_model_version({name!r}, source="s3://bucket/elsewhere")
say(version(v2))
say(version(c.update_model_version({name!r}, "1.0.0", description="described again")))
say(version(c.get_model_version({name!r}, "1.0.0")))
say([version(v) for v in c.get_latest_versions({name!r})])
say(model(c.get_registered_model({name!r})))
say(refused(lambda: c.delete_registered_model({name!r})))
""")
    created, got, updated, got_updated, elsewhere, rid, v1, v2, v1_updated, v1_got, latest, final, refused = out
    assert elsewhere == ["INVALID_PARAMETER_VALUE",
                         "INVALID_PARAMETER_VALUE: [\"Run's experiment does not belong to this model\"]"]
    assert created == got == [name, {"team": "ml", "stage": "dev"}, "first words", []]
    assert updated == got_updated == [name, {"team": "ml", "stage": "dev"}, "second words", []]
    model = db.rows("SELECT id, description, user_id FROM ml_models WHERE project_id = :p AND name = :n",
                    p=PROJECT, n=name)[0]
    assert (model.description, model.user_id) == ("second words", users["developer"])
    assert {tuple(r) for r in db.rows("SELECT name, value FROM ml_model_metadata WHERE model_id = :m",
                                      m=model.id)} == {("team", "ml"), ("stage", "dev")}
    versions = {r.version: r for r in db.rows("""
        SELECT v.id, v.version, v.description, v.package_id, c.eid::text AS run, c.id AS candidate
        FROM ml_model_versions v LEFT JOIN ml_candidates c ON c.model_version_id = v.id
        WHERE v.model_id = :m""", m=model.id)}
    assert set(versions) == {"1.0.0", "2.0.0"}
    first, second = versions["1.0.0"], versions["2.0.0"]
    # GitLab's MLflow version is the row id, its alias the semantic version; the run given
    # becomes the version's, without one a new run is made for it
    assert v1[:6] == [str(first.id), ["1.0.0"], rid, {"k": "v"}, "from a run", "READY"]
    assert first.run == rid and second.run not in (None, rid)
    assert v2[:6] == [str(second.id), ["2.0.0"], second.run, {}, "", "READY"]
    assert v1_updated[:5] == v1_got[:5] == [str(first.id), ["1.0.0"], rid, {"k": "v"}, "described again"]
    assert (first.description, second.description) == ("described again", None)
    assert {tuple(r) for r in db.rows("SELECT name, value FROM ml_model_version_metadata WHERE model_version_id "
                                      "= :v", v=first.id)} == {("k", "v")}
    assert [v[:2] for v in latest] == [[str(second.id), ["2.0.0"]]]
    # GitLab's RegisteredModel entity gives every version as latest_versions (expose :versions)
    assert final == [name, {"team": "ml", "stage": "dev"}, "second words", [str(first.id), str(second.id)]]
    assert refused[0] == "INTERNAL_ERROR" and "Model could not be deleted" in refused[1]  # 400 {"message"}
    packages = sorted(r[0] for r in db.rows("SELECT package_id FROM ml_model_versions WHERE model_id = :m",
                                            m=model.id))
    assert len(packages) == 2 and None not in packages
    assert db.scalar("SELECT count(*) FROM ml_models WHERE id = :m", m=model.id) == 1  # refused: kept
    mine = {(r.endpoint, r.table_name, r.action) for r in db.rows(
        "SELECT endpoint, table_name, action FROM toolkit.mlflow_writes WHERE model_id = :m", m=model.id)}
    assert {("registered-models/create", "ml_models", "insert"), ("registered-models/create", "ml_model_metadata",
            "insert"), ("registered-models/update", "ml_models", "update"),
            ("model-versions/create", "ml_model_versions", "insert"),
            ("model-versions/update", "ml_model_versions", "update")} <= mine

    # a Maintainer deletes it: the model, its versions and their runs gone, packages pending destruction
    out = said(client(server, PROJECT, f"""
c.delete_registered_model({name!r})
try:
    c.get_registered_model({name!r})
except MlflowException as exc:
    say(exc.error_code)
""", env={"MLFLOW_TRACKING_TOKEN": maintainer_token}))
    assert out == ["RESOURCE_DOES_NOT_EXIST"]
    assert db.scalar("SELECT count(*) FROM ml_models WHERE id = :m", m=model.id) == 0
    assert db.scalar("SELECT count(*) FROM ml_model_versions WHERE model_id = :m", m=model.id) == 0
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE id = ANY(:c)",
                     c=[first.candidate, second.candidate]) == 0
    assert {r[0] for r in db.rows("SELECT status FROM packages_packages WHERE id = ANY(:k)", k=packages)} == \
        {PENDING_DESTRUCTION}
    assert ("registered-models/delete", "ml_models", "delete") in {
        (r.endpoint, r.table_name, r.action) for r in db.rows(
            "SELECT endpoint, table_name, action FROM toolkit.mlflow_writes WHERE model_id = :m", m=model.id)}


READ_BACK = """
e = c.get_experiment_by_name({name!r})
[run] = c.search_runs([e.experiment_id])
r = c.get_run(run.info.run_id)
say([mlflow.__version__.split(".")[0], e.experiment_id, e.name, e.lifecycle_stage, r.info.run_id, r.info.run_name,
     r.info.status, r.info.start_time, r.info.end_time, r.info.user_id, r.data.params, r.data.metrics,
     {{k: v for k, v in r.data.tags.items()}},
     sorted((m.key, m.value, m.step, m.timestamp) for k in ("loss", "acc") for m in c.get_metric_history(r.info.run_id, k))])
"""


def test_the_mlflow_2_client_writes_a_training_run_the_3_client_reads_the_same(db, server, tokens, users):
    """The last 2.x client (2.22.4) logs a training script through the server; it and the
    3.x client read it back identically, and the rows are GitLab's."""
    python = os.environ.get(MLFLOW2_PYTHON_ENV)
    if not python:
        pytest.skip(f"set {MLFLOW2_PYTHON_ENV} to the python of a venv with mlflow-skinny 2.22.4 (as .ci/run "
                    "makes it: python3 -m venv .ci/mlflow2 && .ci/mlflow2/bin/pip install 'mlflow-skinny==2.22.4')")
    name = f"writes: mlflow 2 training {next(_names)}"
    env = {"MLFLOW_TRACKING_TOKEN": tokens["dev_api"]}
    written = said(client(server, PROJECT, f"""
e = mlflow.set_experiment({name!r})
run = mlflow.start_run(run_name="from mlflow 2")
mlflow.log_param("lr", "0.01")
for step in range(3):
    mlflow.log_metric("loss", 1.0 / (step + 1), step=step, timestamp=1700000000000 + step)
mlflow.set_tag("client", "two")
c.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric("acc", 0.75, 1700000000100, 3)],
            params=[mlflow.entities.Param("epochs", "5")], tags=[mlflow.entities.RunTag("stage", "dev")])
mlflow.end_run()
say([mlflow.__version__, e.experiment_id, run.info.run_id])
""" + READ_BACK.format(name=name), python=python, env=env))
    (version, experiment_id, run_id), older = written
    assert version.startswith("2.") and older[0] == "2"
    [newer] = said(client(server, PROJECT, READ_BACK.format(name=name), env=env))
    assert newer[0] == "3" and newer[1:] == older[1:]
    (experiment_iid, got_name, stage, got_run, run_name, status, _start, end, user, params, metrics, tags,
     history) = newer[1:]
    assert (experiment_iid, got_name, stage, got_run, run_name, status, user) == (
        experiment_id, name, "active", run_id, "from mlflow 2", "FINISHED", str(users["developer"]))
    assert end is not None
    assert params == {"lr": "0.01", "epochs": "5"} and metrics == {"loss": pytest.approx(1 / 3), "acc": 0.75}
    assert (tags["client"], tags["stage"]) == ("two", "dev")
    assert history == [["acc", 0.75, 3, 1700000000100], ["loss", pytest.approx(1 / 3), 2, 1700000000002],
                       ["loss", 0.5, 1, 1700000000001], ["loss", 1.0, 0, 1700000000000]]
    # the rows, as GitLab holds them, each recorded
    candidate = db.rows("""SELECT c.id, c.status, c.user_id, x.iid, x.name FROM ml_candidates c
                           JOIN ml_experiments x ON x.id = c.experiment_id WHERE c.eid = CAST(:e AS uuid)""",
                        e=run_id)[0]
    assert (candidate.status, candidate.user_id, str(candidate.iid), candidate.name) == (
        2, users["developer"], experiment_id, name)
    assert {tuple(r) for r in db.rows("SELECT name, value FROM ml_candidate_params WHERE candidate_id = :c",
                                      c=candidate.id)} == {("lr", "0.01"), ("epochs", "5")}
    assert db.scalar("SELECT count(*) FROM ml_candidate_metrics WHERE candidate_id = :c", c=candidate.id) == 4
    assert {(r.endpoint, r.table_name) for r in db.rows(
        "SELECT endpoint, table_name FROM toolkit.mlflow_writes WHERE candidate_id = :c", c=candidate.id)} == {
        ("runs/create", "ml_candidates"), ("runs/log-parameter", "ml_candidate_params"),
        ("runs/log-metric", "ml_candidate_metrics"), ("runs/set-tag", "ml_candidate_metadata"),
        ("runs/log-batch", "ml_candidate_metrics"), ("runs/log-batch", "ml_candidate_params"),
        ("runs/log-batch", "ml_candidate_metadata"), ("runs/update", "ml_candidates"),
        ("runs/create", "ml_candidate_metadata")}


def test_runs_get_their_experiments_model_once_the_column_exists(db, server, tokens):
    """After milestone 2 ``ml_candidates.model_id`` exists: a run is inserted with its
    experiment's model (``stages.candidate_parent``). The column is added here by hand, the
    last test of the module, as milestone 2 adds it."""
    experiment = db.rows("SELECT iid, model_id FROM ml_experiments WHERE project_id = :p AND model_id IS NOT NULL "
                         "ORDER BY iid LIMIT 1", p=PROJECT)
    assert experiment, "the adversarial seed has experiments of models"
    db.execute("ALTER TABLE ml_candidates ADD COLUMN IF NOT EXISTS model_id bigint")
    status, document, _ = raw(server, PROJECT, "runs/create", body={"experiment_id": experiment[0].iid},
                              token=tokens["dev_api"])
    assert status == 200, document
    assert db.scalar("SELECT model_id FROM ml_candidates WHERE eid = CAST(:e AS uuid)",
                     e=document["run"]["info"]["run_id"]) == experiment[0].model_id


def test_the_registry_writes_are_served_beside_the_tracking_ones(db, server, tokens):
    """``registry_writes.WRITES`` joins ``Api.writes``: the client creates a model and a
    version through the server, each in a write transaction of its own."""
    name = f"writes-model-{next(_names)}"
    out = run_client(server, tokens, f"""
c.create_registered_model({name!r})
v = c.create_model_version({name!r}, source="ignored")
say([v.version, c.get_registered_model({name!r}).name])
""")
    model = db.scalar("SELECT id FROM ml_models WHERE project_id = :p AND name = :n", p=PROJECT, n=name)
    version = db.rows("SELECT id, version FROM ml_model_versions WHERE model_id = :m", m=model)
    # GitLab's MLflow version is the version row's id; its semantic version is 1.0.0
    assert out == [[str(version[0].id), name]] and version[0].version == "1.0.0"
    assert db.scalar("SELECT count(*) FROM toolkit.mlflow_writes WHERE endpoint = 'registered-models/create' "
                     "AND table_name = 'ml_models' AND row_id = :m", m=model) == 1


# --- the write transaction itself ------------------------------------------------------------
def test_the_write_transaction_retries_answers_and_never_half_writes(db):
    """:class:`Writer` on the module's database, with endpoint functions that meet what a
    migration can do to a write: a table gone under it (the stage changed), a
    serialization failure or deadlock, a value the database refuses, a stage not served."""
    from toolkit.mlflow_api.errors import ApiError
    from toolkit.mlflow_api.writing import Writer, tables_written

    engine = create_engine(db.url, pool_size=2)
    writer = Writer(engine, timeouts=(1000, 10_000))
    attempts: list[str] = []
    marker = f"writes-writer-{next(_names)}"

    def insert_marker(conn) -> None:
        conn.execute(sa.text("INSERT INTO ml_experiment_metadata (created_at, updated_at, experiment_id, name, "
                             "value, project_id) SELECT now(), now(), min(id), :n, 'v', :p FROM ml_experiments "
                             "WHERE project_id = :p"), {"n": f"{marker}-{next(_names)}", "p": PROJECT})

    @tables_written("ml_experiment_metadata")
    def stage_changes_once(conn, ctx, params):
        attempts.append(ctx.stage.name)
        insert_marker(conn)  # written, then undone with the attempt
        if len(attempts) == 1:
            conn.execute(sa.text("SELECT * FROM no_such_table_dropped_by_a_milestone"))
        return {"attempts": len(attempts)}

    @tables_written("ml_experiment_metadata")
    def conflicts(conn, ctx, params):
        attempts.append("conflict")
        insert_marker(conn)
        conn.execute(sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40P01'; END $$"))
        return {}

    @tables_written("ml_experiment_metadata")
    def refused_value(conn, ctx, params):
        insert_marker(conn)
        conn.execute(sa.text("INSERT INTO ml_experiment_metadata (created_at, updated_at, experiment_id, name, "
                             "value, project_id) VALUES (now(), now(), -1, 'x', 'v', :p)"), {"p": PROJECT})
        return {}

    @tables_written("ml_experiment_metadata")
    def not_served(conn, ctx, params):
        insert_marker(conn)
        raise NotImplementedError("later")

    def call(function, project: int = PROJECT) -> dict | ApiError:
        try:
            return writer.write(function, "test/endpoint", str(project), "http://x", {}, None)
        except ApiError as exc:
            return exc

    try:
        assert call(stage_changes_once) == {"attempts": 2} and attempts == ["EXPERIMENTS", "EXPERIMENTS"]
        attempts.clear()
        answer = call(conflicts)
        assert isinstance(answer, ApiError) and answer.status == 503 and dict(answer.headers)["Retry-After"]
        assert len(attempts) == 5  # run again, then given up as a 503 the client retries
        answer = call(refused_value)
        assert isinstance(answer, ApiError) and (answer.status, answer.error_code) == (400, "INVALID_PARAMETER_VALUE")
        answer = call(not_served)
        assert isinstance(answer, ApiError) and (answer.status, answer.error_code) == (403, "FEATURE_DISABLED")
        assert "nothing was written" in answer.message
        answer = call(stage_changes_once, project=999999)
        assert isinstance(answer, ApiError) and answer.body == {"message": "404 Project Not Found"}
        # of every attempt, only the one that succeeded left its row
        assert db.scalar("SELECT count(*) FROM ml_experiment_metadata WHERE name LIKE :n", n=f"{marker}-%") == 1
    finally:
        engine.dispose()

