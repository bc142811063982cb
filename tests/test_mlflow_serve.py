"""``toolkit mlflow serve`` read by the real MLflow client (``mlflow-skinny`` from PyPI, the
test extra), each in a process of its own, on the adversarial profile.

One database and one server for the module: the server runs as ``python -m toolkit …
mlflow serve`` with pages of at most 5 rows, and the client reads with pages of 2, so
every search and every metric history is paged. The walk (``toolkit.mlflow_api.walk``)
reads every experiment of every project (search, get, get-by-name), every run (search,
get) and every metric key's history, as canonical JSON.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from itertools import count

import pytest
import sqlalchemy as sa
from conftest import PREFIX, Database, _create_database, _drop_database
from helpers import TALLY, resolve_m1_anomalies, toolkit
from mlflow_serving import serve_process

from toolkit.db import create_engine
from toolkit.mlflow_api import walk as walk_module
from toolkit.mlflow_api.walk import client_version
from toolkit.sandbox.adversarial import LONG_ASCII_NAME, LONG_UNICODE_NAME, NOTHING_LEFT_NAMES, ODD_NAMES

MILESTONES = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")
SERVER_PAGE, CLIENT_PAGE = 5, 2
# A Python whose mlflow is a 2.x release (a venv with `pip install mlflow-skinny==2.22.4`):
# that client reads the same as the pinned 3.x one. Optional, to spare the suite an install.
MLFLOW2_PYTHON_ENV = "TOOLKIT_TEST_MLFLOW2_PYTHON"
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5"}
_numbers = count()

pytestmark = pytest.mark.skipif(client_version() is None,
                                reason="the MLflow client is not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def db(pg_server, templates) -> Iterator[Database]:
    name = f"{PREFIX}mlflow_{next(_numbers)}"
    _create_database(pg_server, name, templates.get("adversarial:small"))
    database = Database(name, pg_server.url(name), create_engine(pg_server.url(name)))
    resolve_m1_anomalies(database)  # as the runbook says, so milestone 1 verifies
    yield database
    database.engine.dispose()
    _drop_database(pg_server, name)


@pytest.fixture(scope="module")
def server(db, tmp_path_factory) -> Iterator[str]:
    """``toolkit mlflow serve`` on a free port, pages of at most SERVER_PAGE; its http://HOST:PORT."""
    stderr = tmp_path_factory.mktemp("mlflow_serve") / "stderr.txt"
    with serve_process(db, "--max-page-size", str(SERVER_PAGE), stderr=stderr) as (_, address):
        yield address


def projects(db) -> list[int]:
    return [r[0] for r in db.rows("SELECT id FROM projects ORDER BY id")]


def walk(server: str, db, *, runs_only: bool = False, python: str | None = None) -> dict:
    # as a script, so that another interpreter (another MLflow) needs no toolkit installed
    words = [python or sys.executable, walk_module.__file__, server, *map(str, projects(db)),
             "--page-size", str(CLIENT_PAGE)] + (["--runs-only"] if runs_only else [])
    done = subprocess.run(words, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **CLIENT_ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    reading = json.loads(done.stdout)
    # artifact_uri is GitLab's, which milestone 1 changes on purpose for the runs it converts
    # (a declared difference, proven in test_proof.py); everything else reads the same
    for project in reading["projects"].values():
        for run in project["runs"].values():
            run.pop("artifact_uri", None)
    return reading


def client(server: str, project: int, code: str) -> subprocess.CompletedProcess:
    """``code`` run by the real client, ``c`` an MlflowClient of ``project``."""
    prelude = ("import json, mlflow\nfrom mlflow import MlflowClient\n"
               "from mlflow.exceptions import MlflowException\nc = MlflowClient()\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **CLIENT_ENV,
                               "MLFLOW_TRACKING_URI": f"{server}/api/v4/projects/{project}/ml/mlflow"})


def raw(server: str, project: int, endpoint: str, *, query: str = "", body: dict | None = None) -> tuple:
    url = f"{server}/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/{endpoint}" + (f"?{query}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def without_history(reading: dict) -> dict:
    return {p: {"experiments": r["experiments"],
                "runs": {i: {k: v for k, v in run.items() if k != "history"} for i, run in r["runs"].items()}}
            for p, r in reading["projects"].items()}


def test_everything_is_read_with_every_awkward_name(server, db):
    reading = walk(server, db)
    assert reading["client"].startswith("mlflow 3.")
    assert reading["inconsistent"] == []
    assert reading["experiments"] == db.scalar("SELECT count(*) FROM ml_experiments")
    assert reading["runs"] == db.scalar("SELECT count(*) FROM ml_candidates")
    assert reading["metric_points"] == db.scalar("SELECT count(*) FROM ml_candidate_metrics")
    names = {e["name"] for r in reading["projects"].values() for e in r["experiments"]}
    for name in (LONG_ASCII_NAME, LONG_UNICODE_NAME, *NOTHING_LEFT_NAMES, *ODD_NAMES,
                 "Robert'); DROP TABLE ml_experiments; --"):
        assert name in names, name  # and get_experiment_by_name found it (no inconsistency)
    assert "   " in names  # nothing but spaces: trailing ones kept
    nan = [h for r in reading["projects"].values() for run in r["runs"].values()
           for h in run.get("history", {}).get("edge", [])]
    assert {"nan", "inf", "-inf"} <= {point[0] for point in nan}


def test_an_mlflow_2_client_reads_the_same(server, db):
    python = os.environ.get(MLFLOW2_PYTHON_ENV)
    if not python:
        pytest.skip(f"set {MLFLOW2_PYTHON_ENV} to the python of a venv with mlflow-skinny 2.x")
    older, pinned = walk(server, db, python=python), walk(server, db)
    assert older["client"].startswith("mlflow 2.") and older["inconsistent"] == []
    assert {**older, "client": ""} == {**pinned, "client": ""}


def test_answers_codes_isolation_and_refused_writes(server, db, tmp_path):
    # project isolation: an iid of project 1 that project 2 lacks, a name and a run of project 2
    iid = db.scalar("SELECT max(iid) FROM ml_experiments WHERE project_id = 1")
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE project_id = 2 AND iid = :i", i=iid) == 0
    name = db.scalar("""SELECT name FROM ml_experiments WHERE project_id = 2
                        AND name NOT IN (SELECT name FROM ml_experiments WHERE project_id = 1) LIMIT 1""")
    eid = str(db.scalar("SELECT eid FROM ml_candidates WHERE project_id = 2 LIMIT 1"))
    isolated = client(server, 2, f"""
try:
    c.get_experiment({str(iid)!r}); print("found")
except MlflowException as e:
    print(e.error_code)
print(c.get_experiment_by_name({name!r}) is not None)
""")
    assert isolated.stdout.split() == ["RESOURCE_DOES_NOT_EXIST", "True"], isolated.stderr[-2000:]
    assert client(server, 1, f"print(c.get_experiment_by_name({name!r}))").stdout.strip() == "None"
    assert raw(server, 1, "runs/get", query=f"run_id={eid}")[0] == 404
    assert raw(server, 2, "runs/get", query=f"run_id={eid}")[0] == 200
    assert raw(server, 999999, "experiments/list")[0] == 404

    # GitLab's answers (tests/test_mlflow_gitlab_answers.py has them all, with their sources):
    # resource_not_found! carries no message; Grape's validation errors are {"error": ...}
    assert raw(server, 1, "experiments/get", query="experiment_id=999999") == \
        (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
    assert raw(server, 2, "experiments/get", query="experiment_id=abc") == \
        (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})  # Rails casts it to nil
    assert raw(server, 2, "runs/get") == (400, {"error": "run_id is missing"})
    assert raw(server, 2, "metrics/get-history", query=f"run_id={eid}") == \
        (400, {"error": "metric_key is missing"})
    forged = base64.urlsafe_b64encode(json.dumps({"o": "created_at DESC", "k": ["abc", 1]}).encode()).decode()
    for token in ("nonsense", forged):
        status, answer = raw(server, 1, "runs/search", body={"experiment_ids": ["1"], "page_token": token})
        assert (status, answer["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), answer
    status, listed = raw(server, 1, "experiments/list")
    assert status == 200 and len(listed["experiments"]) == db.scalar(
        "SELECT count(*) FROM ml_experiments WHERE project_id = 1")
    model = db.scalar("SELECT name FROM ml_models WHERE project_id = 1 ORDER BY id LIMIT 1")
    status, found = raw(server, 1, "registered-models/get", query=f"name={model}")
    assert status == 200 and found["registered_model"]["name"] == model
    assert raw(server, 1, "registered-models/get", query="name=no-such-model")[0] == 404
    preview = f"{server}/api/v4/projects/1/ml/mlflow/api/2.0/preview/mlflow/registered-models/get?name={model}"
    with urllib.request.urlopen(preview, timeout=30) as answer:  # where MLflow 1.x asks
        assert json.loads(answer.read())["registered_model"]["name"] == model

    # a lock held on a table it reads (a milestone's schema change): 503 after the server's
    # lock_timeout (1 s), which MLflow clients retry, instead of queuing behind it
    with db.engine.connect() as holder:
        holder.execute(sa.text("LOCK TABLE ml_candidates IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        status, answer = raw(server, 2, "runs/get", query=f"run_id={eid}")
        assert (status, answer["error_code"]) == (503, "TEMPORARILY_UNAVAILABLE"), answer
        assert time.monotonic() - started < 5
        holder.rollback()
    assert raw(server, 2, "runs/get", query=f"run_id={eid}")[0] == 200

    # writes: refused with an MLflow error, and nothing changed
    before = tmp_path / "before.json"
    assert toolkit(db, "fingerprint", "--out", str(before)).exit_code == 0
    run = str(db.scalar("SELECT eid FROM ml_candidates WHERE project_id = 1 LIMIT 1"))
    refused = client(server, 1, f"""
calls = [lambda: c.create_experiment("new"), lambda: c.create_run("1"),
         lambda: c.log_metric({run!r}, "m", 1.0), lambda: c.log_param({run!r}, "p", "v"),
         lambda: c.set_tag({run!r}, "t", "v"), lambda: c.set_terminated({run!r}, "FAILED"),
         lambda: c.create_registered_model("new-model"), lambda: c.delete_run({run!r})]
for call in calls:
    try:
        call(); print("said: accepted")
    except MlflowException as e:
        print("said:", e.error_code)
""")
    said = [line.split()[1] for line in refused.stdout.splitlines() if line.startswith("said: ")]
    assert said == ["FEATURE_DISABLED"] * 8, refused.stdout + refused.stderr[-2000:]
    status, answer = raw(server, 1, "runs/log-batch", body={"run_id": run, "metrics": []})
    assert status == 403 and "read-only" in answer["message"] and "--allow-writes" in answer["message"]
    compared = toolkit(db, "fingerprint", "--compare", str(before))
    assert compared.exit_code == 0, compared.output


def _batches_done(db) -> int:
    if db.scalar("SELECT to_regclass('toolkit.checkpoints')") is None:
        return 0  # the toolkit's schema is created by the first run
    return db.scalar("SELECT COALESCE(sum(batches_done), 0) FROM toolkit.checkpoints")


def _reading_while(db, server: str, args: list[str], expected: dict) -> int:
    """Run ``toolkit ARGS`` (a migrate or rollback in slow batches) and read every run
    through the endpoint again and again meanwhile; each reading must equal ``expected``.
    Returns how many readings had batches committed while they read."""
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "--database-url", db.url_text, "-q", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    overlapped = 0
    try:
        while process.poll() is None:
            started = _batches_done(db)
            reading = walk(server, db, runs_only=True)
            ended = _batches_done(db)
            assert reading["inconsistent"] == [], (args, reading["inconsistent"])  # no run seen twice
            assert without_history(reading) == expected, args
            overlapped += ended != started
    finally:
        out, err = process.communicate(timeout=300)
    assert process.returncode == 0, (args, out, err)
    return overlapped


def test_the_same_reading_before_during_and_after_every_milestone_and_rollback(server, db):
    """1 -> 4 -> 1: the whole reading (metric histories included) after each step equals
    the one before milestone 1, and readings while each milestone's batches run see every
    run exactly once, with the same content."""
    original = walk(server, db)
    assert original["inconsistent"] == []
    expected = without_history(original)
    slow = ["--batch-size", "10", "--pause-ms", "40"]
    during: dict[str, int] = {}
    for milestone in MILESTONES:
        during[f"migrate {milestone}"] = _reading_while(db, server, ["migrate", milestone, "--yes", *slow],
                                                        expected)
        assert walk(server, db) == original, milestone
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('ml_experiments')")).scalar() is None
    for milestone in reversed(MILESTONES):
        assert toolkit(db, "rollback", milestone).exit_code == 0
        assert walk(server, db) == original, f"rollback {milestone}"
    assert all(during.values()), during  # every migrate was read while its batches committed
    TALLY["MLflow client readings while milestone batches committed"] += sum(during.values())


def _without_experiment_tags(reading: dict) -> dict:
    """The reading but experiments' tags: after ``archive drop`` those are the models'
    metadata (the experiments' own tags went with the archive; docs/mlflow.md, "The proof")."""
    return {**reading, "projects": {
        p: {**r, "experiments": [{k: v for k, v in e.items() if k != "tags"} for e in r["experiments"]]}
        for p, r in reading["projects"].items()}}


def test_after_the_archive_drop_the_clients_read_the_same_but_experiment_tags(server, db):
    """The blueprint's final state, served: milestones 1 to 4 again, then ``archive drop``;
    both clients read every experiment, run and metric history as before milestone 1,
    only the experiments' tags are now their models' metadata. Runs last in the module:
    the drop cannot be undone."""
    before = walk(server, db)
    for milestone in MILESTONES:
        assert toolkit(db, "migrate", milestone, "--yes").exit_code == 0, milestone
    assert toolkit(db, "archive", "drop", "--yes").exit_code == 0
    assert db.scalar("SELECT to_regclass('toolkit.m4_archive_ml_experiments') IS NULL")
    after = walk(server, db)
    assert after["inconsistent"] == []
    assert _without_experiment_tags(after) == _without_experiment_tags(before)
    tags = {(p, e["id"]): e["tags"] for p, r in after["projects"].items() for e in r["experiments"]}
    for row in db.rows("""SELECT k.project_id, k.iid, mm.name, mm.value FROM toolkit.mlflow_experiment_ids k
                          JOIN ml_model_metadata mm ON mm.model_id = k.model_id"""):
        assert tags[(str(row.project_id), str(row.iid))][row.name] == row.value
    python = os.environ.get(MLFLOW2_PYTHON_ENV)
    if python:  # the last 2.x client reads the final state the same
        older = walk(server, db, python=python)
        assert {**older, "client": ""} == {**after, "client": ""}
