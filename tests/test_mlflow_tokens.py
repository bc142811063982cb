"""Tokens, scopes and project access of ``toolkit mlflow serve``, answered as GitLab answers.

One adversarial database and one ``toolkit mlflow serve`` process (both token sources) for
the module. Personal access tokens are stored the way GitLab stores them: the digest is
computed here from a secrets file this test writes, following GitLab's Ruby
(``Gitlab::CryptoHelper.sha256``: ``Digest::SHA256.base64digest("#{token}#{salt}")`` with the
salt ``db_key_base[0..31]``), and the scopes as Rails serializes an array (YAML).
Every expected status and document is GitLab's (``lib/api/helpers.rb``, ``lib/api/api_guard.rb``,
rack-oauth2's errors, ``lib/api/ml/mlflow/*.rb``, ``app/policies/project_policy.rb``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import Database
from mlflow_serving import adversarial_database

from toolkit.cli.mlflow import open_reads_refusal
from toolkit.errors import ExitCode
from toolkit.mlflow_api.auth import (
    READ_EXPERIMENTS,
    READ_REGISTRY,
    WRITE_EXPERIMENTS,
    WRITE_REGISTRY,
    needs_for,
    presented_token,
)
from toolkit.mlflow_api.walk import client_version
from toolkit.sandbox.adversarial import ADMIN_USERNAME

DB_KEY_BASE = "4f1c" * 32  # 128 hex characters, as gitlab-secrets.json holds them
PROJECT = 1  # private (visibility_level 0), a member at each access level
UNAUTHORIZED = (401, {"message": "401 Unauthorized"})
PROJECT_NOT_FOUND = (404, {"message": "404 Project Not Found"})
NOT_FOUND = (404, {"message": "404 Not Found"})
SCOPE = {"error": "insufficient_scope",
         "error_description": "The request requires higher privileges than provided by the access token.",
         "scope": "api read_api"}
TODAY = datetime.now(UTC).date()  # Rails compares a date with Time.current in UTC
_numbers = count()

pytestmark = pytest.mark.skipif(client_version() is None,
                                reason="the MLflow client is not installed: pip install -e '.[test]'")


def gitlab_digest(token: str) -> str:
    """GitLab's token_digest, written out from its Ruby, independently of the toolkit."""
    salt = DB_KEY_BASE[0:32]
    return base64.b64encode(hashlib.sha256(f"{token}{salt}".encode()).digest()).decode()


@pytest.fixture(scope="module")
def db(pg_server, templates) -> Iterator[Database]:
    with adversarial_database(pg_server, templates, "tokens", resolved=False) as database:
        yield database


@pytest.fixture(scope="module")
def people(db) -> dict[str, int]:
    """User ids by role on PROJECT, as the sandbox seeded project_authorizations."""
    levels = {10: "guest", 20: "reporter", 30: "developer", 40: "maintainer"}
    found = {levels[r.access_level]: r.user_id for r in db.rows(
        "SELECT user_id, access_level FROM project_authorizations WHERE project_id = :p AND access_level < 50 "
        "AND user_id IN (SELECT id FROM users WHERE state = 'active')", p=PROJECT)}
    found["none"] = db.scalar("""SELECT min(id) FROM users WHERE state = 'active' AND NOT admin AND id NOT IN
                                 (SELECT user_id FROM project_authorizations WHERE project_id = :p)""", p=PROJECT)
    found["admin"] = db.scalar("SELECT id FROM users WHERE username = :u", u=ADMIN_USERNAME)
    for state in ("blocked", "deactivated", "blocked_pending_approval"):
        found[state] = db.scalar("SELECT id FROM users WHERE state = :s", s=state)
    assert set(levels.values()) <= set(found) and all(found.values()), found
    return found


@pytest.fixture(scope="module")
def tokens(db, people, tmp_path_factory) -> dict[str, str]:
    """Personal access tokens in the database (as GitLab writes them) and a tokens file."""
    stored = {  # name: (user, scopes as Rails writes them, revoked, expires_at)
        "dev_api": ("developer", "---\n- api\n", False, None),
        "dev_read_api": ("developer", "---\n- read_api\n", False, TODAY + timedelta(days=30)),
        "dev_read_user": ("developer", "---\n- read_user\n", False, None),
        "dev_symbol_api": ("developer", "---\n- :api\n- :read_user\n", False, None),
        "dev_revoked": ("developer", "---\n- api\n", True, None),
        "dev_expired": ("developer", "---\n- api\n", False, TODAY - timedelta(days=1)),
        "dev_expires_today": ("developer", "---\n- api\n", False, TODAY),  # expires_at <= Time.current
        "reporter_api": ("reporter", "---\n- api\n", False, None),
        "guest_api": ("guest", "---\n- api\n", False, None),
        "none_api": ("none", "---\n- api\n", False, None),
        "admin_api": ("admin", "---\n- api\n", False, None),
        "blocked_api": ("blocked", "---\n- api\n", False, None),
        "deactivated_api": ("deactivated", "---\n- api\n", False, None),
        "pending_api": ("blocked_pending_approval", "---\n- api\n", False, None),
    }
    made = {}
    for name, (who, scopes, revoked, expires) in stored.items():
        token = f"glpat-{name.replace('_', '-')}-{next(_numbers):04d}"
        db.execute("""INSERT INTO personal_access_tokens
                          (user_id, name, revoked, expires_at, created_at, updated_at, scopes, token_digest)
                      VALUES (:u, :n, :r, :e, now(), now(), :s, :d)""",
                   u=people[who], n=name, r=revoked, e=expires, s=scopes, d=gitlab_digest(token))
        made[name] = token
    in_file = {"file_maintainer": ("maintainer", ["api"]), "file_guest_read": ("guest", ["read_api"])}
    entries = []
    for name, (who, scopes) in in_file.items():
        made[name] = f"rehearsal-{name}-token"
        username = db.scalar("SELECT username FROM users WHERE id = :u", u=people[who])
        entries.append({"token": made[name], "user": username, "scopes": scopes})
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "tokens.yml").write_text(json.dumps(entries))  # JSON is YAML
    (folder / "gitlab-secrets.json").write_text(json.dumps({"gitlab_rails": {"db_key_base": DB_KEY_BASE}}))
    made["_folder"] = str(folder)
    return made


def _start(db, *options: str) -> tuple[subprocess.Popen, str, list[str]]:
    """The server; its stderr (an access log line per request) goes to a file, whose name is
    ``process.stderr_path``: a pipe nobody reads would fill and stop the server."""
    with tempfile.NamedTemporaryFile("w", suffix=".stderr", delete=False) as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "toolkit", "--database-url", db.url_text, "mlflow", "serve", "--port", "0",
             *options], stdout=subprocess.PIPE, stderr=err, text=True)
    process.stderr_path = err.name
    address, said = None, []
    for line in process.stdout:
        said.append(line)
        if line.startswith("Serving "):
            address = line.split(" at ")[1].split()[0]
        if line.startswith("Ctrl-C"):
            break
    assert address, "".join(said) + Path(err.name).read_text()
    return process, address, said


@pytest.fixture(scope="module")
def server(db, tokens) -> Iterator[tuple[str, list[str]]]:
    folder = tokens["_folder"]
    process, address, said = _start(db, "--tokens-file", f"{folder}/tokens.yml",
                                    "--gitlab-secrets", f"{folder}/gitlab-secrets.json")
    try:
        yield address, said
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=20)
        err = Path(process.stderr_path).read_text()
        assert process.returncode == 0, err
        # the access log names the token's user on the requests it let in, "-" on those refused
        assert re.search(r"^access: GET \S+ 200 \d+ ms user=(?!-)\S+ ", err, re.M), err[-2000:]
        assert re.search(r"^access: GET \S+ 401 \d+ ms user=- ", err, re.M), err[-2000:]
        for name, token in tokens.items():  # never printed, not even in an error
            assert name.startswith("_") or token not in out + err + "".join(said), name


def call(server, endpoint: str, *, token: str | None = None, how: str = "bearer", project: int = PROJECT,
         body: dict | None = None, query: str = "") -> tuple[int, dict, dict]:
    address = server[0]
    headers = {}
    if token is not None and how == "bearer":
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None and how == "private-token":
        headers["PRIVATE-TOKEN"] = token
    elif token is not None:
        query = f"{query}&private_token={token}" if query else f"private_token={token}"
    url = f"{address}/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/{endpoint}" + (f"?{query}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read()), answer.headers  # names in any case
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def get(server, token=None, **kw) -> tuple[int, dict]:
    status, document, _ = call(server, "experiments/get", token=token, query="experiment_id=1", **kw)
    return status, document


def search(server, token=None, **kw) -> tuple[int, dict]:
    status, document, _ = call(server, "experiments/search", token=token, body={"max_results": 5}, **kw)
    return status, document


def runs_search(server, token=None, **kw) -> tuple[int, dict]:
    status, document, _ = call(server, "runs/search", token=token, body={"experiment_ids": ["1"]}, **kw)
    return status, document


def test_no_token_a_wrong_one_revoked_expired_and_each_header_form(server, tokens):
    assert get(server) == UNAUTHORIZED
    assert search(server) == UNAUTHORIZED
    assert get(server, "glpat-not-a-token-at-all") == UNAUTHORIZED
    assert get(server, "") == UNAUTHORIZED  # "Bearer " and nothing
    for how in ("bearer", "private-token", "param"):
        status, document = get(server, tokens["dev_api"], how=how)
        assert status == 200 and document["experiment"]["experiment_id"] == "1", (how, document)
    assert get(server, tokens["dev_api"], how="bearer")[0] == 200
    status, document, headers = call(server, "experiments/get", token=tokens["dev_revoked"],
                                     query="experiment_id=1")
    assert (status, document) == (401, {"error": "invalid_token", "error_description":
                                        "Token was revoked. You have to re-authorize from the user."})
    assert headers["WWW-Authenticate"].startswith('Bearer realm="Protected by OAuth 2.0", error="invalid_token"')
    expired = (401, {"error": "invalid_token",
                     "error_description": "Token is expired. You can either do re-authorization or token refresh."})
    assert get(server, tokens["dev_expired"]) == expired
    assert get(server, tokens["dev_expires_today"]) == expired
    assert get(server, tokens["dev_read_api"])[0] == 200  # expires in 30 days: still good


def test_scopes_read_api_only_for_get_and_the_post_searches_refused(server, tokens):
    assert get(server, tokens["dev_read_api"])[0] == 200
    assert search(server, tokens["dev_read_api"]) == (403, SCOPE)
    assert runs_search(server, tokens["dev_read_api"]) == (403, SCOPE)
    assert call(server, "registered-models/get", token=tokens["dev_read_api"], query="name=x")[0] == 404
    assert get(server, tokens["dev_read_user"]) == (403, SCOPE)
    assert search(server, tokens["dev_read_user"]) == (403, SCOPE)
    for name in ("dev_api", "dev_symbol_api"):  # Rails' YAML of strings, and of older symbols
        assert get(server, tokens[name])[0] == 200, name
        status, document = search(server, tokens[name])
        assert status == 200 and document["experiments"], name
        assert runs_search(server, tokens[name])[0] == 200, name
    assert search(server, tokens["file_guest_read"]) == (403, SCOPE)  # scope before access


def test_blocked_deactivated_and_pending_users_are_refused(server, tokens):
    assert get(server, tokens["blocked_api"]) == (403, {"message": "403 Forbidden - Your account has been blocked."})
    assert get(server, tokens["pending_api"]) == (403, {
        "message": "403 Forbidden - Your account is pending approval from your administrator and hence blocked."})
    status, document = get(server, tokens["deactivated_api"])
    assert status == 403 and document["message"].startswith(
        "403 Forbidden - Your account has been deactivated by your administrator. Please log back in from a "
        f"web browser to reactivate your account at {server[0]}"), document


def test_each_access_level_on_a_private_project(server, tokens):
    # GET needs read_model_experiments (guest); the POST searches also write_model_experiments
    # (developer): check_api_write! answers 401 below it
    assert (get(server, tokens["guest_api"])[0], search(server, tokens["guest_api"])) == (200, UNAUTHORIZED)
    assert (get(server, tokens["reporter_api"])[0], runs_search(server, tokens["reporter_api"])) == (200,
                                                                                                    UNAUTHORIZED)
    assert get(server, tokens["dev_api"])[0] == 200 and search(server, tokens["dev_api"])[0] == 200
    assert get(server, tokens["file_maintainer"])[0] == 200 and search(server, tokens["file_maintainer"])[0] == 200
    assert get(server, tokens["file_guest_read"])[0] == 200  # a tokens-file token, read_api, guest
    assert get(server, tokens["none_api"]) == PROJECT_NOT_FOUND
    assert search(server, tokens["none_api"]) == PROJECT_NOT_FOUND
    # an admin reads the project (owner_access) but is no member: read_model_experiments is not his
    assert get(server, tokens["admin_api"]) == NOT_FOUND
    assert get(server, tokens["dev_api"], project=999_999) == PROJECT_NOT_FOUND
    # the registry's read needs the same guest membership
    status, document, _ = call(server, "registered-models/get", token=tokens["guest_api"], query="name=no-such")
    assert (status, document["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
    assert call(server, "registered-models/get", token=tokens["none_api"], query="name=x")[:2] == PROJECT_NOT_FOUND


def test_public_and_internal_projects(server, db, tokens, people):
    public, internal = (r.id for r in db.rows("SELECT id FROM projects WHERE id <> :p ORDER BY id LIMIT 2",
                                              p=PROJECT))
    with db.engine.begin() as conn:  # the user without access to PROJECT, without access to these two
        held = list(conn.execute(sa.text("""
            DELETE FROM project_authorizations WHERE user_id = :u AND project_id IN (:a, :b)
            RETURNING user_id, project_id, access_level"""), {"u": people["none"], "a": public, "b": internal}))
    db.execute("UPDATE projects SET visibility_level = 20 WHERE id = :p", p=public)
    db.execute("UPDATE projects SET visibility_level = 10 WHERE id = :p", p=internal)
    try:
        # public: anyone with a token reads (public_project & model_experiments_enabled), no one
        # who is not a developer searches
        assert call(server, "experiments/list", token=tokens["none_api"], project=public)[0] == 200
        assert search(server, tokens["none_api"], project=public) == UNAUTHORIZED
        # internal: the project is readable, its experiments are not (`~public_project & guest`)
        assert call(server, "experiments/list", token=tokens["none_api"], project=internal)[:2] == NOT_FOUND
    finally:
        db.execute("UPDATE projects SET visibility_level = 0 WHERE id IN (:a, :b)", a=public, b=internal)
        for row in held:
            db.execute("INSERT INTO project_authorizations (user_id, project_id, access_level) VALUES (:u, :p, :l)",
                       u=row.user_id, p=row.project_id, l=row.access_level)


def _client(server, token: str, code: str) -> subprocess.CompletedProcess:
    prelude = ("from mlflow import MlflowClient\nfrom mlflow.exceptions import MlflowException\n"
               "c = MlflowClient()\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_TOKEN": token,
                               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                               "MLFLOW_TRACKING_URI": f"{server[0]}/api/v4/projects/{PROJECT}/ml/mlflow"})


def test_the_mlflow_client_with_mlflow_tracking_token(server, db, tokens):
    experiments = db.scalar("SELECT count(*) FROM ml_experiments WHERE project_id = :p", p=PROJECT)
    good = _client(server, tokens["dev_api"],
                   "print(len(c.search_experiments(max_results=1000)), c.get_experiment('1').experiment_id)")
    assert good.stdout.split() == [str(experiments), "1"], good.stderr[-2000:]
    # the client raises what GitLab's body says (no MLflow error_code: INTERNAL_ERROR)
    code = """
for call in (lambda: c.get_experiment('1'), lambda: c.search_experiments()):
    try:
        call(); print(json.dumps("read"))
    except MlflowException as e:
        print(json.dumps(str(e)))
"""
    done = _client(server, "glpat-wrong", "import json\n" + code)
    assert [json.loads(line) for line in done.stdout.splitlines()] == ["INTERNAL_ERROR: 401 Unauthorized"] * 2, \
        done.stderr[-3000:]
    # read_api: GitLab lets the client get an experiment but not search (a POST)
    done = _client(server, tokens["dev_read_api"], "import json\n" + code)
    said = [json.loads(line) for line in done.stdout.splitlines()]
    assert said[0] == "read" and "insufficient_scope" in said[1], (said, done.stderr[-3000:])


def test_tokens_are_announced_and_open_reads_only_on_loopback(server, db, tokens, tmp_path):
    assert any(line.startswith("Tokens: every request is checked") for line in server[1])
    process, _, said = _start(db)  # no token source, on 127.0.0.1: open, and it says so
    process.terminate()
    process.communicate(timeout=20)
    assert sum("No token source" in line for line in said) == 1

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert open_reads_refusal(host, has_tokens=False) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "gitlab.example.com"):
        assert open_reads_refusal(host, has_tokens=False) is not None, host
        assert open_reads_refusal(host, has_tokens=True) is None, host
    refused = subprocess.run([sys.executable, "-m", "toolkit", "--database-url", db.url_text, "mlflow", "serve",
                              "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == ExitCode.USAGE
    assert "Serving" not in refused.stdout
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "without a token source" in lines[0] and "--tokens-file" in lines[0], lines

    # a tokens file that names no such user, or is malformed: refused, never echoing a token
    secret = "do-not-print-this-token"
    for entries, said_in_error in (([{"token": secret, "user": "nobody-here", "scopes": ["api"]}], "nobody-here"),
                                   ([{"token": secret, "user": "user1", "scopes": "api"}], "entry 1"),
                                   ([{"token": secret, "user": "user1", "scopes": ["api"]}] * 2, "twice")):
        path = tmp_path / "tokens.yml"
        path.write_text(json.dumps(entries))
        done = subprocess.run([sys.executable, "-m", "toolkit", "--database-url", db.url_text, "mlflow", "serve",
                               "--port", "0", "--tokens-file", str(path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == ExitCode.USAGE, done.stderr
        assert said_in_error in done.stderr and secret not in done.stdout + done.stderr


def test_what_each_endpoint_needs_and_which_token_counts():
    # the before blocks of lib/api/ml/mlflow/*.rb and mlflow_artifacts/artifacts.rb
    assert needs_for("experiments/get", "GET") == (READ_EXPERIMENTS,)
    assert needs_for("metrics/get-history", "HEAD") == (READ_EXPERIMENTS,)
    assert needs_for("experiments/search", "POST") == (READ_EXPERIMENTS, WRITE_EXPERIMENTS)
    assert needs_for("runs/log-batch", "POST") == (READ_EXPERIMENTS, WRITE_EXPERIMENTS)
    # registry routes write only where GitLab sets `route_setting :api, write: true`
    assert needs_for("registered-models/get-latest-versions", "POST") == (READ_EXPERIMENTS, READ_REGISTRY)
    assert needs_for("registered-models/search", "GET") == (READ_EXPERIMENTS, READ_REGISTRY)
    assert needs_for("model-versions/get-download-uri", "GET") == (READ_EXPERIMENTS, READ_REGISTRY)
    assert needs_for("registered-models/delete", "DELETE") == (READ_EXPERIMENTS, READ_REGISTRY,
                                                                WRITE_EXPERIMENTS, WRITE_REGISTRY)
    assert needs_for("model-versions/update", "PATCH") == (READ_EXPERIMENTS, READ_REGISTRY,
                                                            WRITE_EXPERIMENTS, WRITE_REGISTRY)
    assert needs_for("artifacts", "GET") == (READ_EXPERIMENTS, READ_REGISTRY)
    # auth_finders: private_token parameter, PRIVATE-TOKEN, then Doorkeeper's access_token
    # parameter, Bearer header, bearer_token parameter
    every = {"Authorization": "Bearer b", "PRIVATE-TOKEN": "h"}
    params = {"private_token": "p", "access_token": "a", "bearer_token": "t"}
    assert presented_token(every, params) == "p"
    assert presented_token(every, {"access_token": "a"}) == "h"
    assert presented_token({"Authorization": "bearer b"}, {"access_token": "a", "bearer_token": "t"}) == "a"
    assert presented_token({"Authorization": "bearer b"}, {"bearer_token": "t"}) == "b"
    assert presented_token({"Authorization": "Basic dTpw"}, {"bearer_token": ["t"]}) == "t"
    assert presented_token({"Authorization": "Basic dTpw"}, {}) is None
    assert presented_token({"private-token": "lower", "AUTHORIZATION": "Bearer b"}, {}) == "lower"
