"""``toolkit mlflow serve`` answers the tracking reads as GitLab answers them: the project
named by id or by URL-encoded full path, GitLab's orders and keyset pages, metric history
order, and every error document, byte for byte.

The expected answers are written from GitLab's source and request specs (gitlabhq,
``lib/api/ml/mlflow/{api_helpers,experiments,runs,metrics}.rb``,
``app/finders/projects/ml/{experiment,candidate}_finder.rb``, ``app/models/concerns/
sortable.rb``, ``lib/gitlab/pagination/keyset/simple_order_builder.rb``,
``spec/requests/api/ml/mlflow/*_spec.rb``; commits in ``docs/mlflow.md``), never from the
toolkit's output. Rows with known names, times and metric points are added to an
adversarial database so that every order can be written down by hand: ties in
``lower(name)``, NULL names, equal timestamps, NULL metric values and NULL steps.

Two servers read the database: GitLab's behaviour, and ``--lenient`` (which reads the
first entry of the list ``order_by`` that MLflow clients send, mlflow/mlflow#13082).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
import sqlalchemy as sa
from conftest import PREFIX, Database, _create_database, _drop_database
from mlflow_serving import serving

from toolkit.db import create_engine
from toolkit.mlflow_api.walk import client_version

SERVER_PAGE = 5
# A Python whose mlflow is a 2.x release (tests/test_mlflow_serve.py, .ci/run): optional
MLFLOW2_PYTHON_ENV = "TOOLKIT_TEST_MLFLOW2_PYTHON"
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
T0 = datetime(2024, 1, 1, tzinfo=UTC)
_numbers = count()

pytestmark = pytest.mark.skipif(client_version() is None,
                                reason="the MLflow client is not installed: pip install -e '.[test]'")


# --- the rows every expected order below is written from -----------------------------------
ZOO_PROJECT, ZOO_PATH = 9001, "group3/zoo"
# experiments of the zoo project: name, created_at (hours after T0), updated_at (hours)
ZOO_EXPERIMENTS = (("beta", 1, 1), ("Alpha", 0, 3), ("alpha", 2, 2), ("Gamma", 1, 1))
# runs of one experiment of project 2: name, created_at (hours), metric "score" points
RUNS = (("b", 2, (0.1, 0.9)), ("B", 0, (0.5,)), ("a", 1, (0.9,)), (None, 1, (None,)),
        (None, 0, ()), ("c", 2, (0.1,)))
# metric "loss" of the first run, in insertion (id) order: (step, tracked_at); the value
# is the point's number, 1 to 8
HISTORY = ((2, 100), (None, 50), (0, 300), (1, 200), (1, 100), (1, 100), (0, None), (None, None))


@pytest.fixture(scope="module")
def db(pg_server, templates) -> Iterator[Database]:
    name = f"{PREFIX}gitlab_answers_{next(_numbers)}"
    _create_database(pg_server, name, templates.get("adversarial:small"))
    database = Database(name, pg_server.url(name), create_engine(pg_server.url(name)))
    _add_rows(database)
    yield database
    database.engine.dispose()
    _drop_database(pg_server, name)


def _at(hours: int) -> datetime:
    return T0 + timedelta(hours=hours)


def _insert(db: Database, sql: str, **params: object) -> int:
    """An INSERT … RETURNING id, committed."""
    with db.engine.begin() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


def _add_rows(db: Database) -> None:
    group3 = db.scalar("SELECT id FROM namespaces WHERE path = 'group3' AND parent_id IS NULL")
    db.execute("INSERT INTO projects (id, name, path, namespace_id) VALUES (:p, 'zoo', 'zoo', :n)",
               p=ZOO_PROJECT, n=group3)
    db.execute("""INSERT INTO routes (source_id, source_type, path, name)
                  VALUES (:p, 'Project', :path, :path)""", p=ZOO_PROJECT, path=ZOO_PATH)
    for iid, (name, created, updated) in enumerate(ZOO_EXPERIMENTS, start=1):
        db.execute("""INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
                      VALUES (:c, :u, :iid, :p, :name)""",
                   c=_at(created), u=_at(updated), iid=iid, p=ZOO_PROJECT, name=name)
    iid = db.scalar("SELECT max(iid) + 1 FROM ml_experiments WHERE project_id = 2")
    experiment = _insert(db, """INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
                              VALUES (:t, :t, :iid, 2, 'ordering') RETURNING id""", t=T0, iid=iid)
    for number, (name, created, scores) in enumerate(RUNS, start=1):
        run = _insert(db, """
            INSERT INTO ml_candidates (created_at, updated_at, experiment_id, status, name, eid,
                                       project_id, internal_id)
            VALUES (:t, :t, :e, 2, :name, :eid, 2, :iid) RETURNING id""",
            t=_at(created), e=experiment, name=name, eid=uuid.UUID(int=number), iid=90_000 + number)
        for score in scores:
            db.execute("""INSERT INTO ml_candidate_metrics (created_at, updated_at, candidate_id, value,
                                                            is_nan, name, tracked_at, step)
                          VALUES (:t, :t, :c, :v, :nan, 'score', 1, 0)""",
                       t=T0, c=run, v=score, nan=b"\x01" if score is None else None)
        if number == 1:
            for value, (step, tracked_at) in enumerate(HISTORY, start=1):
                db.execute("""INSERT INTO ml_candidate_metrics (created_at, updated_at, candidate_id,
                                                                value, name, tracked_at, step)
                              VALUES (:t, :t, :c, :v, 'loss', :tracked, :step)""",
                           t=T0, c=run, v=float(value), tracked=tracked_at, step=step)
    db.execute("ANALYZE")


def _serve(db: Database, *extra: str) -> Iterator[str]:
    with serving(db, "--max-page-size", str(SERVER_PAGE), *extra) as address:
        yield address


@pytest.fixture(scope="module")
def server(db) -> Iterator[str]:
    yield from _serve(db)


@pytest.fixture(scope="module")
def lenient(db) -> Iterator[str]:
    yield from _serve(db, "--lenient")


def raw(server: str, project: str | int, endpoint: str, *, query: str = "",
        body: dict | None = None) -> tuple[int, dict | str]:
    """Status and JSON document (the text of a text/plain answer: GitLab's Rack-level 400)."""
    url = f"{server}/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/{endpoint}" + (f"?{query}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if exc.headers.get_content_type() == "application/json" else text.decode()


def client(server: str, project: str | int, code: str, python: str = sys.executable) -> list:
    """``code`` run by the real client (``c`` an MlflowClient of ``project``) of the
    interpreter ``python``; what it prints with ``say(...)``, as JSON values."""
    prelude = ("import json, mlflow\nfrom mlflow import MlflowClient\n"
               "from mlflow.exceptions import MlflowException\nc = MlflowClient()\n"
               "def say(x): print('said:', json.dumps(x))\n")
    done = subprocess.run([python, "-c", prelude + code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **CLIENT_ENV,
                               "MLFLOW_TRACKING_URI": f"{server}/api/v4/projects/{project}/ml/mlflow"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("said: ")]


def _pages(server: str, project: str | int, endpoint: str, body: dict, items: str) -> list[dict]:
    """Every page of a search, 2 rows a page, each token fed back as the client does."""
    found: list[dict] = []
    token = None
    while True:
        status, page = raw(server, project, endpoint, body={**body, "max_results": 2,
                                                             **({"page_token": token} if token else {})})
        assert status == 200, page
        assert len(page[items]) <= 2
        found += page[items]
        token = page["next_page_token"]  # GitLab always gives the key, null on the last page
        if token is None:
            return found


def _ordering_experiment(db) -> str:
    return str(db.scalar("SELECT iid FROM ml_experiments WHERE project_id = 2 AND name = 'ordering'"))


def _run_number(db) -> dict[str, int]:
    return {str(uuid.UUID(int=n)): n for n in range(1, len(RUNS) + 1)}


# --- the project: id or URL-encoded full path --------------------------------------------------
def test_a_project_is_found_by_its_full_path_as_gitlab_finds_it(server, db):
    listed = raw(server, 1, "experiments/list")
    assert listed[0] == 200 and listed[1]["experiments"]
    # lib/api/helpers.rb find_project: a full path through routes, case-insensitively
    # (Routable.find_by_full_path); the URL carries it encoded (requirements: [^/]+)
    path = db.scalar("SELECT path FROM routes WHERE source_type = 'Project' AND source_id = 1")
    assert path.count("/") == 3  # a project in a subgroup of a subgroup
    for given in (path, path.upper(), path.lower()):
        encoded = given.replace("/", "%2F")
        assert raw(server, encoded, "experiments/list") == listed, given
    assert raw(server, "group2%2Fproject-2", "experiments/list") == raw(server, 2, "experiments/list")
    # the real client, with the path in its tracking URI
    said = client(server, path.replace("/", "%2F"), """
found, token = [], None
while True:
    page = c.search_experiments(max_results=2, page_token=token)
    found += [e.experiment_id for e in page]
    token = page.token
    if not token:
        break
say(sorted(found))
""")
    assert said == [sorted(e["experiment_id"] for e in listed[1]["experiments"])]

    # not found: spec/requests/api/ml/mlflow/experiments_spec.rb 'when project does not exist'
    # expects json_response['message'] == '404 Project Not Found'
    for unknown in ("999999", "group2%2Fnope", "group1%2FTeam-ML", "project-2", "-1", "abc"):
        assert raw(server, unknown, "experiments/list") == (404, {"message": "404 Project Not Found"}), unknown
        assert raw(server, unknown, "runs/search", body={"experiment_ids": ["1"]}) == \
            (404, {"message": "404 Project Not Found"}), unknown
    # a project hidden or pending deletion is not found (find_project_scopes)
    db.execute("UPDATE projects SET pending_delete = true WHERE id = :p", p=ZOO_PROJECT)
    try:
        assert raw(server, ZOO_PROJECT, "experiments/list")[0] == 404
    finally:
        db.execute("UPDATE projects SET pending_delete = false WHERE id = :p", p=ZOO_PROJECT)


# --- experiments: ExperimentFinder's order -----------------------------------------------------
def test_experiments_search_orders_as_experiment_finder(server, db):
    zoo = ZOO_PATH.replace("/", "%2F")
    e1, e2, e3, e4 = "1", "2", "3", "4"  # the iids of beta, Alpha, alpha, Gamma
    cases = {
        # experiments.rb: order_by defaults to 'created_at DESC'; ties id DESC (with_order_id_desc)
        None: [e3, e4, e1, e2],
        # experiments_spec.rb 'name ASC' orders by name; Sortable: lower(name), ties id DESC
        "name ASC": [e3, e2, e1, e4],
        "name": [e3, e2, e1, e4],  # model_order_params: sort ||= 'asc'
        "NAME DESC": [e4, e1, e3, e2],  # downcased
        "name sideways": [e4, e1, e3, e2],  # ExperimentFinder: an unknown sort is desc
        # experiments_spec.rb 'something DESC' gives the default order: the finder's id, here desc
        "something DESC": [e4, e3, e2, e1],
        "something ASC": [e1, e2, e3, e4],  # ...keeping the direction asked for
        "": [e3, e2, e1, e4],  # blank: model_order_params' name asc
        "created_at ASC": [e2, e4, e1, e3],  # ties still id DESC
        "last_updated_timestamp DESC": [e2, e3, e4, e1],  # mapped to updated_at
    }
    for order_by, expected in cases.items():
        body = {} if order_by is None else {"order_by": order_by}
        found = [e["experiment_id"] for e in _pages(server, zoo, "experiments/search", body, "experiments")]
        assert found == expected, order_by
    # experiments/list: ExperimentRepository#all, the finder's default order, id DESC
    listed = raw(server, zoo, "experiments/list")[1]["experiments"]
    assert [e["experiment_id"] for e in listed] == [e4, e3, e2, e1]
    assert listed[0] == {"experiment_id": e4, "name": "Gamma", "lifecycle_stage": "active",
                         "artifact_location": "not_implemented", "tags": []}


def test_the_list_order_by_of_mlflow_clients_is_refused_as_on_gitlab(server, lenient, db):
    zoo = ZOO_PATH.replace("/", "%2F")
    experiment = _ordering_experiment(db)
    for endpoint, body in (("experiments/search", {"order_by": ["name ASC"]}),
                           ("runs/search", {"experiment_ids": [experiment], "order_by": ["name ASC"]})):
        status, answer = raw(server, zoo if endpoint.startswith("experiments") else 2, endpoint, body=body)
        # Grape's coercion of `type: String` rejects an Array: "order_by is invalid"
        assert status == 400 and list(answer) == ["error"], answer
        assert answer["error"].startswith("order_by is invalid (") and "mlflow/mlflow#13082" in answer["error"]
    code = """
try:
    say([e.experiment_id for e in c.search_experiments(order_by=["name ASC"])])
except MlflowException as e:
    say("refused" if "order_by is invalid" in str(e) else str(e))
say([e.experiment_id for e in c.search_experiments()])
"""
    assert client(server, zoo, code) == ["refused", ["3", "4", "1", "2"]]
    assert client(lenient, zoo, code) == [["3", "2", "1", "4"], ["3", "4", "1", "2"]]


# --- runs: CandidateFinder's order, metrics.<key> with its keyset --------------------------------
def test_runs_search_orders_as_candidate_finder(server, lenient, db):
    experiment = _ordering_experiment(db)
    number = _run_number(db)
    cases = {
        # runs_spec.rb: no order is created_at DESC; ties id DESC
        None: [6, 1, 4, 3, 5, 2],
        "created_at ASC": [5, 2, 4, 3, 6, 1],  # the tie-breaker stays id DESC
        # runs_spec.rb 'name ASC' → [a, b, c]; lower(name), NULLs last ascending
        "name ASC": [3, 2, 1, 6, 5, 4],
        # descending: NULLs first (SimpleOrderBuilder#nullability), ties id DESC
        "name DESC": [5, 4, 6, 2, 1, 3],
        "name": [5, 4, 6, 2, 1, 3],  # CandidateFinder: no direction is desc
        "id ASC": [1, 2, 3, 4, 5, 6],
        # runs_spec.rb 'something DESC' and 'params.something' give the default column...
        "something DESC": [6, 1, 4, 3, 5, 2],
        "params.lr": [6, 1, 4, 3, 5, 2],
        "something ASC": [5, 2, 4, 3, 6, 1],  # ...with the direction asked for
        "attributes.start_time DESC": [6, 1, 4, 3, 5, 2],  # not metrics.<key>: nothing
        # runs_spec.rb 'metrics.metric1' orders by the latest value, desc; runs without the
        # metric are left out (INNER JOIN); the keyset puts NULL values last; ties id DESC
        "metrics.score": [3, 1, 2, 6, 4],
        "metrics.score DESC": [3, 1, 2, 6, 4],
        "metrics.score ASC": [6, 2, 3, 1, 4],
        "metrics.score.extra ASC": [6, 2, 3, 1, 4],  # split('.')[1]: the key is 'score'
        "metrics.nothing": [],  # runs_spec.rb 'metrics.something': no results
    }
    for order_by, expected in cases.items():
        body = {"experiment_ids": [experiment], **({} if order_by is None else {"order_by": order_by})}
        found = [number[r["info"]["run_id"]] for r in _pages(server, 2, "runs/search", body, "runs")]
        assert found == expected, order_by
    # the client, paging with its own page size, through --lenient's first entry
    said = client(lenient, 2, f"""
from mlflow.entities import ViewType
runs, token = [], None
while True:
    page = c.search_runs([{experiment!r}], order_by=["metrics.score ASC", "name"], max_results=2,
                         page_token=token, run_view_type=ViewType.ALL)
    runs += [r.info.run_id for r in page]
    token = page.token
    if not token:
        break
say(runs)
""")
    assert [number[r] for r in said[0]] == [6, 2, 3, 1, 4]


def test_metric_history_is_ordered_by_step_then_time(server, db):
    run = str(uuid.UUID(int=1))
    # CandidateMetric.for_history: step ASC, tracked_at ASC (NULLs last), then id DESC
    expected_values = [3.0, 7.0, 6.0, 5.0, 4.0, 1.0, 2.0, 8.0]
    found, token = [], None
    while True:
        query = f"run_id={run}&metric_key=loss&max_results=3" + (f"&page_token={token}" if token else "")
        status, page = raw(server, 2, "metrics/get-history", query=query)
        assert status == 200 and len(page["metrics"]) <= 3, page
        found += page["metrics"]
        token = page["next_page_token"]
        if token is None:
            break
    assert [m["value"] for m in found] == expected_values
    # the Metric entity: timestamp always (null when none), step only when there is one
    assert found[1] == {"key": "loss", "value": 7.0, "timestamp": None, "step": 0}
    assert found[-1] == {"key": "loss", "value": 8.0, "timestamp": None}
    said = client(server, 2, f"say([[m.value, m.step] for m in c.get_metric_history({run!r}, 'loss')])")
    assert said == [[[v, s] for v, s in zip(expected_values, (0, 0, 1, 1, 1, 2, 0, 0), strict=True)]]
    # metrics_spec.rb 'when metric does not exist': 200 and no metrics
    assert raw(server, 2, "metrics/get-history", query=f"run_id={run}&metric_key=nope") == \
        (200, {"metrics": [], "next_page_token": None})


# --- every error document ----------------------------------------------------------------------
def test_every_error_document_is_gitlabs(server, db):
    not_found = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})  # api_helpers.rb resource_not_found!
    iid = _ordering_experiment(db)
    run = str(uuid.UUID(int=1))
    cases = [
        # experiments_spec.rb: an unknown experiment, and experiment_id not passed (default '')
        ("experiments/get", "experiment_id=999999", None, not_found),
        ("experiments/get", "", None, not_found),
        # Rails casts a non-numeric id to nil: no experiment, not a parameter error
        ("experiments/get", "experiment_id=abc", None, not_found),
        ("experiments/get", f"experiment_id={'9' * 30}", None, not_found),  # beyond a bigint
        # experiments_spec.rb get-by-name: unknown, and experiment_name not passed
        ("experiments/get-by-name", "experiment_name=random_experiment", None, not_found),
        ("experiments/get-by-name", "", None, not_found),
        # runs_spec.rb 'when run id is not passed' is Bad Request: Grape's message
        ("runs/get", "", None, (400, {"error": "run_id is missing"})),
        ("runs/get", "run_id=12345", None, not_found),  # 'when run_id is invalid'
        ("runs/get", "run_id=", None, not_found),
        # metrics_spec.rb: run_id / metric_key not provided is Bad Request
        ("metrics/get-history", "", None, (400, {"error": "run_id is missing, metric_key is missing"})),
        ("metrics/get-history", f"run_id={run}", None, (400, {"error": "metric_key is missing"})),
        ("metrics/get-history", "metric_key=loss", None, (400, {"error": "run_id is missing"})),
        ("metrics/get-history", "run_id=12345&metric_key=loss", None, not_found),
        ("metrics/get-history", f"run_id={run}&metric_key=loss&max_results=abc", None,
         (400, {"error": "max_results is invalid"})),
        # runs_spec.rb search: experiment_ids not passed (Bad Request), empty, unknown
        ("runs/search", "", {}, (400, {"error": "experiment_ids is missing"})),
        ("runs/search", "", {"experiment_ids": []}, not_found),
        ("runs/search", "", {"experiment_ids": ["999999"]}, not_found),
        ("runs/search", "", {"experiment_ids": iid}, (400, {"error": "experiment_ids is invalid"})),
        ("runs/search", "", {"experiment_ids": [iid], "max_results": "many"},
         (400, {"error": "max_results is invalid"})),
        ("runs/search", "", {"experiment_ids": [iid], "order_by": {"a": 1}},
         (400, {"error": "order_by is invalid"})),
        ("runs/search", "", {"experiment_ids": [iid], "page_token": ["x"]},
         (400, {"error": "page_token is invalid"})),
        ("experiments/search", "", {"max_results": True}, (400, {"error": "max_results is invalid"})),
    ]
    for endpoint, query, body, expected in cases:
        assert raw(server, 2, endpoint, query=query, body=body) == expected, (endpoint, query, body)
    # a page token this server did not give: GitLab answers the database's refusal with
    # invalid_parameter! (entrypoint.rb rescues ActiveRecordError); the toolkit checks first
    for token in ("nonsense", "eyJvIjoicnVuczpjcmVhdGVkX2F0OmRlc2MiLCJrIjpbImFiYyIsMV19"):
        status, answer = raw(server, 2, "runs/search", body={"experiment_ids": [iid], "page_token": token})
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer


def test_odd_ids_find_what_rails_finds(server, db):
    iid = _ordering_experiment(db)
    run = uuid.UUID(int=1)
    found = raw(server, 2, "experiments/get", query=f"experiment_id={iid}")
    assert found[0] == 200 and found[1]["experiment"]["name"] == "ordering"
    # ActiveModel::Type::Integer casts '12abc' as String#to_i does: experiment 12
    assert raw(server, 2, "experiments/get", query=f"experiment_id={iid}abc") == found
    assert raw(server, 2, "experiments/get", query=f"experiment_id=%20{iid}") == found
    # the PostgreSQL uuid type accepts braces and no dashes (ACCEPTABLE_UUID)
    got = raw(server, 2, "runs/get", query=f"run_id={run}")
    assert got[0] == 200
    assert raw(server, 2, "runs/get", query=f"run_id=%7B{run.hex}%7D") == got
    assert raw(server, 2, "runs/get", query=f"run_id={str(run)[:-1]}")[0] == 404
    # run_uuid is ignored: run_id is required (runs.rb)
    assert raw(server, 2, "runs/get", query=f"run_uuid={run}") == (400, {"error": "run_id is missing"})
    # RunInfo's fields, in GitLab's order; run_name and end_time only when set
    info = got[1]["run"]["info"]
    assert list(info) == ["run_id", "run_uuid", "experiment_id", "start_time", "run_name", "status",
                          "artifact_uri", "lifecycle_stage", "user_id"]
    assert (info["run_name"], info["status"], info["user_id"], info["start_time"]) == ("b", "FINISHED", "", 0)


def test_an_mlflow_2_client_meets_the_same_answers(server, lenient, db):
    python = os.environ.get(MLFLOW2_PYTHON_ENV)
    if not python:
        pytest.skip(f"set {MLFLOW2_PYTHON_ENV} to the python of a venv with mlflow-skinny 2.x")
    zoo = ZOO_PATH.replace("/", "%2F")
    experiment = _ordering_experiment(db)
    refused = f"""
say(mlflow.__version__)
try:
    c.search_runs([{experiment!r}], order_by=["metrics.score ASC"])
    say("accepted")
except MlflowException as e:
    say("refused" if "order_by is invalid" in str(e) else str(e))
"""
    said = client(server, 2, refused, python=python)
    assert said[0].startswith("2.") and said[1] == "refused"
    said = client(server, zoo, "say([e.experiment_id for e in c.search_experiments()])", python=python)
    assert said == [["3", "4", "1", "2"]]
    run = str(uuid.UUID(int=1))
    said = client(server, 2, f"say([m.value for m in c.get_metric_history({run!r}, 'loss')])", python=python)
    assert said == [[3.0, 7.0, 6.0, 5.0, 4.0, 1.0, 2.0, 8.0]]
    said = client(lenient, 2, f"""
say([r.info.run_name for r in c.search_runs([{experiment!r}], order_by=["metrics.score ASC"])])
""", python=python)
    assert said == [["c", "B", "a", "b", ""]]  # the 2.x client reads a run without a name as ""


def test_values_postgresql_cannot_take_are_refused_before_any_endpoint(server, db):
    """A NUL or a lone surrogate in the path or a parameter never reaches an endpoint (nor
    PostgreSQL, which refuses it): GitLab's Rack middleware HandleMalformedStrings
    (lib/gitlab/middleware/handle_malformed_strings.rb, its spec: null bytes and malformed
    strings in the path and in params) answers 400, text/plain, "Bad Request"."""
    bad_request = (400, "Bad Request")
    iid = _ordering_experiment(db)
    run = str(uuid.UUID(int=1))
    assert raw(server, 2, "experiments/get-by-name", query="experiment_name=ordering%00") == bad_request
    assert raw(server, 2, "metrics/get-history", query=f"run_id={run}&metric_key=loss%00") == bad_request
    assert raw(server, "group2%00%2Fproject-2", "experiments/list") == bad_request
    for metric in ("metrics.a\x00b", "metrics.\ud800"):
        assert raw(server, 2, "runs/search", body={"experiment_ids": [iid], "order_by": metric}) == bad_request
