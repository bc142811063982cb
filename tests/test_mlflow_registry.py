"""The model registry through ``toolkit mlflow serve``, against what GitLab's source answers.

One adversarial database and one server for the module; the real MLflow client (the pinned
3.x, and a 2.x when ``TOOLKIT_TEST_MLFLOW2_PYTHON`` names one) in a process of its own, raw
HTTP for GitLab's exact documents. The expected answers are written from GitLab's code
(the files and commits ``docs/mlflow.md`` names, "Registry and artifacts"):

* RR  lib/api/ml/mlflow/registered_models.rb   @13518aa9
* MV  lib/api/ml/mlflow/model_versions.rb      @f7f952ac
* AH  lib/api/ml/mlflow/api_helpers.rb          @f7f952ac
* ERM lib/api/entities/ml/mlflow/registered_model.rb @bc7f4d7d
* EMV lib/api/entities/ml/mlflow/model_version.rb    @1e62780b
* EGD lib/api/entities/ml/mlflow/get_download.rb     @f7f952ac
* MF  app/finders/projects/ml/model_finder.rb   @08775893,  SO app/models/concerns/sortable.rb @58340cfe
* MOD app/models/ml/model.rb @68b145f4,  MVM app/models/ml/model_version.rb @07fffa9f
* specs: spec/requests/api/ml/mlflow/registered_models_spec.rb @13518aa9, model_versions_spec.rb @bc7f4d7d

The last test runs milestones 1 to 3 on the module's database (milestone 3 creates models)
and reads the registry again.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from helpers import toolkit
from mlflow_serving import MLFLOW2_PYTHON_ENV, adversarial_database, client, raw, said, serving

from toolkit.mlflow_api.walk import client_version

pytestmark = pytest.mark.skipif(client_version() is None,
                                reason="the MLflow client is not installed: pip install -e '.[test]'")
NOT_FOUND = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})  # AH resource_not_found!


@pytest.fixture(scope="module")
def db(pg_server, templates) -> Iterator:
    with adversarial_database(pg_server, templates, "registry") as database:
        yield database


@pytest.fixture(scope="module")
def server(db) -> Iterator[str]:
    with serving(db, "--max-page-size", "5") as address:
        yield address


def seconds(at) -> int:
    return math.floor(at.timestamp())  # ERM/EMV: created_at.to_i


def versioned_model(db):
    """The model with the most versions, its project, and its versions."""
    model = db.rows("""SELECT m.* FROM ml_models m WHERE EXISTS (SELECT FROM ml_model_versions v
                       WHERE v.model_id = m.id) ORDER BY (SELECT count(*) FROM ml_model_versions v
                       WHERE v.model_id = m.id) DESC, m.id LIMIT 1""")[0]
    versions = db.rows("SELECT * FROM ml_model_versions WHERE model_id = :m ORDER BY id", m=model.id)
    assert len(versions) >= 2
    return model, versions


def expected_version(db, server: str, version) -> dict:
    """EMV, field by field in its order."""
    model = db.rows("SELECT * FROM ml_models WHERE id = :m", m=version.model_id)[0]
    path = db.scalar("SELECT name FROM projects WHERE id = :p", p=model.project_id)  # the sandbox's path
    return {
        "name": model.name,                                   # EMV `object.name` (delegated to model)
        "version": str(version.id),                           # EMV `object.id.to_s`
        "creation_timestamp": seconds(version.created_at),
        "last_updated_timestamp": seconds(version.updated_at),
        "user_id": None,                                      # EMV `def user_id; nil`
        "current_stage": "development",
        "description": version.description or "",            # EMV `description.to_s`
        "source": f"{server}/{path}/-/ml/models/{model.id}/versions/{version.id}",  # project_ml_model_version_path
        "run_id": str(db.scalar("SELECT eid FROM ml_candidates WHERE model_version_id = :v", v=version.id)),
        "status": "READY", "status_message": "",
        "tags": [{"key": t.name, "value": t.value} for t in db.rows(
            "SELECT name, value FROM ml_model_version_metadata WHERE model_version_id = :v ORDER BY id",
            v=version.id)],
        "run_link": "",
        "aliases": [version.version],                         # EMV `[object.version.to_s]`
    }


def expected_model(db, server: str, model) -> dict:
    """ERM: ``latest_versions`` is ``expose :versions ... using: ModelVersion``: every version."""
    versions = [expected_version(db, server, v) for v in db.rows(
        "SELECT * FROM ml_model_versions WHERE model_id = :m ORDER BY id", m=model.id)]
    return {
        "name": model.name, "creation_timestamp": seconds(model.created_at),
        "last_updated_timestamp": seconds(model.updated_at), "description": model.description or "",
        "user_id": "" if model.user_id is None else str(model.user_id),   # ERM `user_id.to_s`
        "tags": [{"key": t.name, "value": t.value} for t in db.rows(
            "SELECT name, value FROM ml_model_metadata WHERE model_id = :m ORDER BY id", m=model.id)],
        "latest_versions": versions,
    }


def test_registered_model_and_its_errors(server, db):
    model, versions = versioned_model(db)
    status, document, _ = raw(server, model.project_id, "registered-models/get", query=f"name={quote(model.name)}")
    assert status == 200
    assert document == {"registered_model": expected_model(db, server, model)}
    assert list(document["registered_model"]) == ["name", "creation_timestamp", "last_updated_timestamp",
                                                  "description", "user_id", "tags", "latest_versions"]
    # spec 'and model does not exist' / 'and name is not passed': resource_not_found!, no message
    assert raw(server, model.project_id, "registered-models/get", query="name=foo")[:2] == NOT_FOUND
    assert raw(server, model.project_id, "registered-models/get")[:2] == NOT_FOUND
    other = db.scalar("SELECT min(id) FROM projects WHERE id <> :p", p=model.project_id)
    assert raw(server, other, "registered-models/get", query=f"name={quote(model.name)}")[:2] == NOT_FOUND

    read = said(client(server, model.project_id, f"""
m = c.get_registered_model({model.name!r})
say([m.name, m.description, dict(m.tags), [[v.name, v.version, list(v.aliases)] for v in m.latest_versions]])
try:
    c.get_registered_model("foo")
except MlflowException as e:
    say(e.error_code)
"""))
    tags = {t.name: t.value for t in db.rows("SELECT * FROM ml_model_metadata WHERE model_id = :m", m=model.id)}
    assert read == [[model.name, model.description or "", tags,
                     [[model.name, str(v.id), [v.version]] for v in versions]], "RESOURCE_DOES_NOT_EXIST"]


def test_latest_versions_model_versions_and_aliases(server, db):
    model, versions = versioned_model(db)
    # MVM latest_by_model: highest semver_major, minor, patch; `stages` is not a parameter (RR)
    latest = max(versions, key=lambda v: (v.semver_major, v.semver_minor, v.semver_patch))
    first = versions[0]
    status, document, _ = raw(server, model.project_id, "registered-models/get-latest-versions",
                              body={"name": model.name, "stages": ["Staging"]})
    assert (status, document) == (200, {"model_versions": [expected_version(db, server, latest)]})
    assert raw(server, model.project_id, "registered-models/get-latest-versions", body={})[:2] == NOT_FOUND
    assert raw(server, model.project_id, "registered-models/get-latest-versions",
               body={"name": "foo"})[:2] == NOT_FOUND

    # model-versions/get and registered-models/alias take the semantic version (MV, RR `alias`)
    status, document, _ = raw(server, model.project_id, "model-versions/get",
                              query=f"name={quote(model.name)}&version={first.version}")
    assert (status, document) == (200, {"model_version": expected_version(db, server, first)})
    status, document, _ = raw(server, model.project_id, "registered-models/alias",
                              query=f"name={quote(model.name)}&alias={first.version}")
    assert (status, document) == (200, {"model_version": expected_version(db, server, first)})
    # spec 'and version in incorrect': the id is not a version
    assert raw(server, model.project_id, "model-versions/get",
               query=f"name={quote(model.name)}&version={first.id}")[:2] == NOT_FOUND
    assert raw(server, model.project_id, "registered-models/alias", query=f"name={quote(model.name)}")[:2] == NOT_FOUND
    # MV: `requires :name, :version`: Grape's own document
    assert raw(server, model.project_id, "model-versions/get")[:2] == (
        400, {"error": "name is missing, version is missing"})
    assert raw(server, model.project_id, "model-versions/get", query="name=x")[:2] == (
        400, {"error": "version is missing"})

    # a GET of get-latest-versions and a refused write, for contrast: only the read POST is open
    assert raw(server, model.project_id, "registered-models/create", body={"name": "n"})[0] == 403

    read = said(client(server, model.project_id, f"""
import warnings
warnings.simplefilter("ignore")
for v in c.get_latest_versions({model.name!r}, stages=["Production"]):
    say([v.name, v.version, v.current_stage, v.run_id, v.source, list(v.aliases), dict(v.tags)])
v = c.get_model_version({model.name!r}, {first.version!r})
say([v.version, list(v.aliases)])
v = c.get_model_version_by_alias({model.name!r}, {first.version!r})
say([v.version, list(v.aliases)])
for call in (lambda: c.get_model_version({model.name!r}, "9.9.9"),
             lambda: c.get_model_version_by_alias({model.name!r}, "9.9.9")):
    try:
        call(); say("found")
    except MlflowException as e:
        say(e.error_code)
"""))
    wanted = expected_version(db, server, latest)
    assert read == [
        [model.name, str(latest.id), "development", wanted["run_id"], wanted["source"], [latest.version],
         {t["key"]: t["value"] for t in wanted["tags"]}],
        [str(first.id), [first.version]], [str(first.id), [first.version]],
        "RESOURCE_DOES_NOT_EXIST", "RESOURCE_DOES_NOT_EXIST"]


def test_download_uri_is_made_from_the_parameters(server, db):
    model, versions = versioned_model(db)
    # EGD "mlflow-artifacts:/#{object}", presented from params[:version] (an Integer) alone
    for version in (versions[0].id, 999999):
        assert raw(server, model.project_id, "model-versions/get-download-uri",
                   query=f"name={quote(model.name)}&version={version}")[:2] == (
            200, {"artifact_uri": f"mlflow-artifacts:/{version}"})
    assert raw(server, model.project_id, "model-versions/get-download-uri",
               query="name=x&version=1.0.0")[:2] == (400, {"error": "version is invalid"})
    assert raw(server, model.project_id, "model-versions/get-download-uri", query="version=3")[:2] == (
        400, {"error": "name is missing"})
    read = said(client(server, model.project_id,
                       f"say(c.get_model_version_download_uri({model.name!r}, {versions[0].id}))"))
    assert read == [f"mlflow-artifacts:/{versions[0].id}"]


def test_numbers_and_page_tokens_no_row_can_match_are_4xx(server, db):
    """Past a bigint no id exists; 5000 digits also pass Python's int() limit; digits of
    another script are no number to Ruby; a forged token's sort value is refused before
    PostgreSQL sees it. None of them may be a 500."""
    model, _ = versioned_model(db)
    project, huge = model.project_id, "9" * 5000
    assert raw(server, project, "model-versions/get-download-uri", query=f"name=x&version={huge}")[:2] == (
        400, {"error": "version is invalid"})
    assert raw(server, project, "registered-models/search", query=f"max_results={huge}")[0] == 400
    assert raw(server, project, "artifacts", api="mlflow-artifacts", query=f"path={huge}")[0] == 404
    assert raw(server, project, "artifacts", api="mlflow-artifacts", query="path=" + quote("\u0661\u0662"))[0] == 404
    forged = [{"s": "created_at_desc", "k": [True, 1]}, {"s": "name_asc", "k": [{}, 1]},
              {"s": "created_at_desc", "k": ["not a time", 1]}, {"s": "id_desc", "k": ["1", 1]},
              {"s": "name_asc", "k": ["a", 2**70]}]
    for token in forged:
        text = base64.urlsafe_b64encode(json.dumps(token).encode()).decode().rstrip("=")
        order = {"created_at_desc": "creation_timestamp DESC", "name_asc": "name ASC", "id_desc": "id DESC"}
        status, document, _ = raw(server, project, "registered-models/search",
                                  query=f"order_by={quote(order[token['s']])}&page_token={text}")
        assert (status, document.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), (token, document)


def test_a_version_without_a_run_fails_as_on_gitlab(server, db):
    """EMV ``run_id``: ``object.candidate.eid`` on a version no candidate points at is a
    NoMethodError, GitLab's 500; every entity that shows the version fails with it."""
    model, _ = versioned_model(db)
    db.execute("""INSERT INTO ml_model_versions (created_at, updated_at, project_id, model_id, version,
                  semver_major, semver_minor, semver_patch) VALUES (now(), now(), :p, :m, '77.0.0', 77, 0, 0)""",
               p=model.project_id, m=model.id)
    orphan = db.scalar("SELECT id FROM ml_model_versions WHERE model_id = :m AND version = '77.0.0'", m=model.id)
    try:
        for endpoint, query in (("model-versions/get", f"name={quote(model.name)}&version=77.0.0"),
                                ("registered-models/get", f"name={quote(model.name)}")):
            status, document, _ = raw(server, model.project_id, endpoint, query=query)
            assert status == 500 and "GitLab fails here too" in document["message"], (endpoint, document)
        status, document, _ = raw(server, model.project_id, "registered-models/get-latest-versions",
                                  body={"name": model.name})
        assert status == 500, document  # 77.0.0 is the latest
    finally:
        db.execute("DELETE FROM ml_model_versions WHERE id = :v", v=orphan)


def search_all(server: str, project: int, query: str) -> list[str]:
    names, token = [], None
    while True:
        status, page, _ = raw(server, project, "registered-models/search",
                              query=query + (f"&page_token={token}" if token else ""))
        assert status == 200, page
        assert list(page) == ["registered_models", "next_page_token"]  # ListRegisteredModels
        names += [m["name"] for m in page["registered_models"]]
        token = page["next_page_token"]
        if token is None:
            return names


def test_search_filters_orders_pages_and_the_prompt_clause(server, db):
    project = db.scalar("SELECT project_id FROM ml_models GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")
    models = db.rows("SELECT * FROM ml_models WHERE project_id = :p", p=project)
    assert len(models) >= 3

    def ordered(sql_order: str) -> list[str]:  # MF: by_project, order_by(...).with_order_id_desc
        return [r.name for r in db.rows(f"SELECT name FROM ml_models WHERE project_id = :p ORDER BY {sql_order}",
                                        p=project)]

    # RR default order_by 'name ASC' -> SO order_name_asc: lower(name), then MF's id DESC
    assert search_all(server, project, "max_results=2") == ordered("lower(name) ASC, id DESC")
    assert search_all(server, project, "max_results=2&order_by=name+DESC") == ordered("lower(name) DESC, id DESC")
    # AH last_updated_timestamp -> updated_at; SO 'updated_at_desc'
    assert search_all(server, project, "max_results=2&order_by=last_updated_timestamp+DESC") == ordered(
        "updated_at DESC, id DESC")
    # MF: an unknown column is created_at, the sort as asked (AH defaults it to asc)
    assert search_all(server, project, "max_results=1&order_by=nonsense") == ordered("created_at ASC, id DESC")
    # GitLab's cap (1000) and the server's page (5) bound a page
    status, page, _ = raw(server, project, "registered-models/search", query="max_results=5000")
    assert status == 200 and len(page["registered_models"]) == min(5, len(models))
    assert raw(server, project, "registered-models/search", query="max_results=abc")[:2] == (
        400, {"error": "max_results is invalid"})

    # AH model_filter_params: name='…' is MOD by_name, LIKE '%…%' (case-sensitive)
    target = models[0].name
    assert search_all(server, project, f"filter={quote(f'name={chr(39)}{target}{chr(39)}')}") == [
        r.name for r in db.rows("""SELECT name FROM ml_models WHERE project_id = :p AND strpos(name, :n) > 0
                                   ORDER BY lower(name), id DESC""", p=project, n=target)]
    assert search_all(server, project, "filter=" + quote('name="%"')) == []  # sanitize_sql_like
    assert search_all(server, project, "filter=name%3D") == ordered("lower(name) ASC, id DESC")
    invalid = {"error_code": "INVALID_PARAMETER_VALUE",
               "message": "Invalid attribute key specified. Valid keys are '{'name'}'"}
    # spec "with an invalid filter supplied"
    assert raw(server, project, "registered-models/search", query="filter=" + quote("description='foo'"))[:2] == (
        400, invalid)
    assert raw(server, project, "registered-models/search", query="filter=")[:2] == (400, invalid)

    # The client adds "tag.`mlflow.prompt.is_prompt` != 'true'": GitLab's split('=') refuses it
    # alone, and reads it as part of the name after a name filter (so nothing matches)
    read = said(client(server, project, f"""
try:
    c.search_registered_models(); say("answered")
except MlflowException as e:
    say([e.error_code, e.message])
say([m.name for m in c.search_registered_models(filter_string="name='{target}'")])
"""))
    code, message = read[0]
    assert code == "INVALID_PARAMETER_VALUE"
    assert invalid["message"] in message and "mlflow.prompt.is_prompt" in message and "docs/mlflow.md" in message
    assert read[1] == []


def test_mlflow_2_client_reads_the_registry_alike(server, db):
    python = os.environ.get(MLFLOW2_PYTHON_ENV)
    if not python:
        pytest.skip(f"set {MLFLOW2_PYTHON_ENV} to the python of a venv with mlflow-skinny 2.x")
    model, versions = versioned_model(db)
    code = f"""
import warnings
warnings.simplefilter("ignore")
say(mlflow.__version__)
say([v.version for v in c.get_latest_versions({model.name!r})])
say(c.get_model_version({model.name!r}, {versions[0].version!r}).version)
say(c.get_model_version_download_uri({model.name!r}, {versions[0].id}))
say(c.get_registered_model({model.name!r}).name)
"""
    older, pinned = said(client(server, model.project_id, code, python=python)), said(
        client(server, model.project_id, code))
    assert older[0].startswith("2.") and older[1:] == pinned[1:]


def test_milestone_3_adds_models_and_copied_tags_and_nothing_else(server, db):
    """Before milestones 1-3 and after: the models that were there read the same but for
    tags milestone 3 copied from their default experiments; the models it created read
    as GitLab reads a model without versions. Then 4 and back to 1: the same readings."""
    projects = [r[0] for r in db.rows("SELECT DISTINCT project_id FROM ml_experiments ORDER BY 1")]

    def every_model() -> dict[tuple[int, str], dict]:
        found = {}
        for project in projects:
            for name in search_all(server, project, "max_results=5"):
                status, document, _ = raw(server, project, "registered-models/get", query=f"name={quote(name)}")
                assert status == 200
                found[(project, name)] = document["registered_model"]
        return found

    before = every_model()
    for milestone in ("milestone-1", "milestone-2", "milestone-3"):
        result = toolkit(db, "migrate", milestone, "--yes")
        assert result.exit_code == 0, result.output
    after = every_model()
    created = {(r.project_id, r.name) for r in db.rows(
        "SELECT m.project_id, m.name FROM toolkit.m3_created_models c JOIN ml_models m ON m.id = c.model_id")}
    assert created and set(after) == set(before) | created and not (created & set(before))
    for key, document in before.items():
        again = after[key]
        assert {**again, "tags": []} == {**document, "tags": []}, key
        assert again["tags"][:len(document["tags"])] == document["tags"], key  # only added
    for project, name in created:
        document = after[(project, name)]
        experiment = db.rows("""SELECT e.id FROM ml_experiments e JOIN ml_models m ON m.id = e.model_id
                                WHERE m.project_id = :p AND m.name = :n""", p=project, n=name)[0]
        copied = {(t.name, t.value) for t in db.rows(
            "SELECT name, value FROM ml_experiment_metadata WHERE experiment_id = :e", e=experiment.id)}
        assert {(t["key"], t["value"]) for t in document["tags"]} == copied
        assert document["latest_versions"] == []
    # GitLab presents [model.latest_version], which is [nil] for a model without versions
    # (grape-entity's serializable_hash returns nil for a nil object); the client cannot
    # parse the null
    project, name = sorted(created)[0]
    assert raw(server, project, "registered-models/get-latest-versions", body={"name": name})[:2] == (
        200, {"model_versions": [None]})
    read = said(client(server, project, f"""
import warnings
warnings.simplefilter("ignore")
try:
    c.get_latest_versions({name!r}); say("parsed")
except Exception as e:
    say(type(e).__name__)
"""))
    assert read == ["ParseError"]

    # on to milestone 4 and back to the start: milestone 4 leaves the registry as milestone
    # 3 made it, and each rollback gives back what was read before it
    result = toolkit(db, "migrate", "milestone-4", "--yes")
    assert result.exit_code == 0, result.output
    assert every_model() == after
    for milestone, expected in (("milestone-4", after), ("milestone-3", before), ("milestone-2", before),
                                ("milestone-1", before)):
        result = toolkit(db, "rollback", milestone)
        assert result.exit_code == 0, result.output
        assert every_model() == expected, f"rollback {milestone}"


@pytest.mark.parametrize(("raw_filter", "expected"), [
    ("name='churn'", (True, "churn")), ('name="churn"', (True, "churn")),
    ("name=", (True, None)),             # "name=".split('=') is ["name"]
    ("name==x", (True, "")),             # ["name", "", "x"]: the second field, blank
    ("=name", (False, None)), ("   ", (False, None)), ("name = 'x'", (False, None)),
    ("tag.`mlflow.prompt.is_prompt` != 'true'", (False, None)),
    ("name='m' AND tag.`mlflow.prompt.is_prompt` != 'true'", (True, "m' AND tag.`mlflow.prompt.is_prompt` !")),
])
def test_the_filter_is_read_as_rubys_split_reads_it(raw_filter, expected):
    """AH model_filter_params: ``param, filter = params[:filter].split('=')``, then the
    outer quotes removed (OUTER_QUOTES_REGEXP) unless blank."""
    from toolkit.mlflow_api.registry import name_filter
    assert name_filter(raw_filter) == expected


@pytest.mark.parametrize(("order_by", "sort"), [
    (None, "name_asc"), ("", "name_asc"), ("NAME desc", "name_desc"),
    ("last_updated_timestamp", "updated_at_asc"), ("created_at DESC", "created_at_desc"),
    ("nonsense", "created_at_asc"),      # MF: unknown column -> created_at; AH: sort ||= 'asc'
    ("name sideways", "name_desc"),      # MF: unknown sort -> desc
    (["id DESC", "name"], "name_asc"),   # a repeated query parameter: Rack keeps the last
])
def test_orders_as_model_order_params_and_the_finder_make_them(order_by, sort):
    from toolkit.mlflow_api.registry import model_sort
    assert model_sort(order_by).key == sort


def test_names_and_ids_as_ruby_reads_them():
    from toolkit.mlflow_api.artifacts import cgi_escape, content_disposition
    from toolkit.mlflow_api.registry import ruby_to_i
    assert cgi_escape("data/model v1.pkl") == "data%2Fmodel+v1.pkl"   # CGI.escape
    assert cgi_escape("a~b_c.d-e") == "a~b_c.d-e" and cgi_escape("ü") == "%C3%BC"
    assert (ruby_to_i(" 12abc"), ruby_to_i("abc"), ruby_to_i("")) == (12, None, None)
    assert content_disposition('a "b".txt') == (                      # ActionDispatch::Http::ContentDisposition
        "attachment; filename=\"a %22b%22.txt\"; filename*=UTF-8''a%20%22b%22.txt")
