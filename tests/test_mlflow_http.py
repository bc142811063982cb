"""``toolkit mlflow serve`` as an HTTP server anyone can reach: slow and stalled clients,
huge bodies, hostile input, a forged ``Host``, clients that leave mid-answer; and its
access log. One adversarial small database and one server process for the module, run
as an operator runs it (``python -m toolkit … mlflow serve``) with short timeouts.

What is expected comes from GitLab's source (named in docs/mlflow.md, "The HTTP server"):
malformed strings and unparsable JSON are ``400 text/plain "Bad Request"``
(``Gitlab::Middleware::HandleMalformedStrings``), JSON deeper than 32 is ``400 {"error":
"Parameters nested too deeply"}`` (``Gitlab::Middleware::JsonValidation``), a value
Grape cannot coerce to the declared type is ``400 {"error": "<name> is invalid"}``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from conftest import Database
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mlflow_serving import adversarial_database, serve_process

EXTERNAL = "https://mlflow.example.test/gitlab"
IDLE_S, REQUEST_S = 2, 4
SLOW_CLIENTS = 200
MB = 1024 * 1024
SECRET = "secret-token-123"


@pytest.fixture(scope="module")
def db(pg_server, templates) -> Iterator[Database]:
    with adversarial_database(pg_server, templates, "mlflow_http", resolved=False) as database:
        yield database


class Served:
    """The server process, where it listens, and its stderr (a file: the access log must
    never fill a pipe nobody reads)."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, stderr: Path):
        self.process, self.host, self.port, self.stderr_path = process, host, port, stderr

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def status(self, field: str) -> int:
        """A number of /proc/PID/status (VmRSS, VmHWM in kB; Threads)."""
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+)", text, re.M)[1])

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            answer = connection.getresponse()
            return answer.status, answer.getheader("Content-Type") or "", answer.read()
        finally:
            connection.close()

    def api(self, project: object, endpoint: str, *, method: str = "GET", query: str = "",
            body: object = None, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        path = f"/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/{endpoint}" + (f"?{query}" if query else "")
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})


@pytest.fixture(scope="module")
def served(db, tmp_path_factory) -> Iterator[Served]:
    stderr = tmp_path_factory.mktemp("mlflow_http") / "stderr.txt"
    with serve_process(db, "--max-page-size", "5", "--external-url", EXTERNAL, "--idle-timeout-s", str(IDLE_S),
                       "--request-timeout-s", str(REQUEST_S), "--max-connections", "400", "--threads", "4",
                       stderr=stderr) as (process, address):
        url = urlsplit(address)
        yield Served(process, url.hostname, url.port, stderr)
    assert "Traceback" not in stderr.read_text()


def wait_for(predicate, what: str, deadline_s: float = 30) -> None:
    """Wait until ``predicate()`` holds (a generous deadline, not a timed assertion)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.1)


def run_of(db) -> tuple[int, str]:
    """A run (its project and eid) that an experiment reaches."""
    row = db.rows("""SELECT c.project_id, c.eid FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id
                     ORDER BY c.id LIMIT 1""")[0]
    return row[0], str(row[1])


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (EOF or reset); False while it is open."""
    sock.setblocking(False)
    try:
        return sock.recv(1024) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


# -- slow clients ------------------------------------------------------------------------

def test_slow_clients_hold_no_thread_and_are_closed_while_others_are_answered(served, db):
    project, eid = run_of(db)
    expected_runs = db.scalar("SELECT count(*) FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id "
                              "WHERE e.project_id = :p AND e.iid = (SELECT min(iid) FROM ml_experiments "
                              "WHERE project_id = :p)", p=project)
    first_iid = db.scalar("SELECT min(iid) FROM ml_experiments WHERE project_id = :p", p=project)
    threads_before = served.status("Threads")
    slow: list[socket.socket] = []
    head = (f"GET /api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/runs/get?run_id={eid} HTTP/1.1\r\n"
            "Host: slow\r\n").encode()
    for number in range(SLOW_CLIENTS):
        sock = socket.create_connection((served.host, served.port), timeout=10)
        if number % 2:  # headers whole, and 10 bytes of a 1000-byte body
            sock.sendall(head.replace(b"GET", b"POST") + b"Content-Length: 1000\r\n\r\n" + b"{" * 10)
        slow.append(sock)
    for offset in range(6):  # the others send their headers a byte at a time
        for sock in slow[::2]:
            sock.sendall(head[offset:offset + 1])

    # a client trickling a byte every half second is never idle: the request timeout ends it
    trickler = socket.create_connection((served.host, served.port), timeout=10)
    stop = threading.Event()

    def trickle() -> None:
        for byte in head * 10:
            if stop.wait(0.5):
                return
            try:
                trickler.sendall(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()

    # meanwhile, every request is answered, and correctly
    for _ in range(5):
        status, _, body = served.api(project, "runs/get", query=f"run_id={eid}")
        assert status == 200 and json.loads(body)["run"]["info"]["run_id"] == eid
        status, _, body = served.api(project, "runs/search", method="POST",
                                     body={"experiment_ids": [str(first_iid)], "max_results": 1000})
        assert status == 200
        runs = json.loads(body)
        assert len(runs["runs"]) == min(expected_runs, 5)  # pages of --max-page-size 5
    assert served.status("Threads") <= threads_before + 1, "a slow client took a thread"

    wait_for(lambda: all(closed_by_server(sock) for sock in slow),
             f"the {SLOW_CLIENTS} stalled clients were not closed after --idle-timeout-s {IDLE_S}")
    wait_for(lambda: closed_by_server(trickler),
             f"the trickling client was not closed after --request-timeout-s {REQUEST_S}")
    stop.set()
    for sock in (*slow, trickler):
        sock.close()
    assert served.api(project, "runs/get", query=f"run_id={eid}")[0] == 200


# -- big bodies and memory ---------------------------------------------------------------

def _chunked_upload(served: Served, path: str, total: int, answers: list[bytes]) -> None:
    """POST ``total`` bytes, chunked, reading the answer in parallel; stops when the server
    closes the connection."""
    sock = socket.create_connection((served.host, served.port), timeout=30)
    received = bytearray()

    def read() -> None:
        try:
            while data := sock.recv(65536):
                received.extend(data)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n" % MB + b" " * MB + b"\r\n"
        for _ in range(total // MB):
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server stopped reading: what a refusal looks like from here
    reader.join(timeout=30)
    sock.close()
    answers.append(bytes(received))


def test_a_100_mb_body_is_refused_and_costs_no_memory(served, db):
    project, _ = run_of(db)
    path = f"/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/runs/search"
    for _ in range(3):
        assert served.api(project, "experiments/list")[0] == 200
    idle_kb = served.status("VmRSS")

    # declared: refused as soon as the headers are read, the body never read
    with socket.create_connection((served.host, served.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {100 * MB}\r\n\r\n".encode())
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 "), answer

    # chunked (no length given), four at once: each read up to the 16 MiB limit, then 413
    peak = [idle_kb]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            peak[0] = max(peak[0], served.status("VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    answers: list[bytes] = []
    uploads = [threading.Thread(target=_chunked_upload, args=(served, path, 100 * MB, answers)) for _ in range(4)]
    for upload in uploads:
        upload.start()
    for upload in uploads:
        upload.join(timeout=120)
    sampling.set()
    sampler.join()
    assert len(answers) == 4
    assert all(a.startswith(b"HTTP/1.1 413 ") for a in answers), [a[:100] for a in answers]
    assert max(peak[0], served.status("VmHWM")) - idle_kb < 50 * 1024, (idle_kb, peak[0])
    assert served.api(project, "experiments/list")[0] == 200


def test_malformed_lengths_and_chunks_are_400(served, db):
    project, _ = run_of(db)
    path = f"/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/runs/search"
    for head in (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                 f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                 f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"):
        with socket.create_connection((served.host, served.port), timeout=30) as sock:
            sock.sendall(head.encode())
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400 "), (head, answer)
    with socket.create_connection((served.host, served.port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 70_000}\r\n\r\n".encode())
        assert re.match(rb"HTTP/1\.[01] 431 ", sock.recv(4096))  # waitress answers it as HTTP/1.0


# -- hostile input -----------------------------------------------------------------------

def test_malformed_input_is_answered_as_gitlab_answers_it(served, db):
    project, eid = run_of(db)
    bad_request = (400, "text/plain", b"Bad Request")

    def plain(answer: tuple[int, str, bytes]) -> tuple[int, str, bytes]:
        return answer[0], answer[1].split(";")[0], answer[2]

    def error(answer: tuple[int, str, bytes]) -> tuple[int, object]:
        return answer[0], json.loads(answer[2])

    # HandleMalformedStrings: unparsable JSON, NUL, invalid UTF-8 (path, query, body), lone surrogates
    assert plain(served.api(project, "runs/search", method="POST", body=b"{not json")) == bad_request
    assert plain(served.api(project, "runs/search", method="POST", body=b'{"a": NaN}')) == bad_request
    assert plain(served.api(project, "experiments/get-by-name", query="experiment_name=a%00b")) == bad_request
    assert plain(served.api(project, "experiments/get-by-name", query="experiment_name=%C0%AF")) == bad_request
    assert plain(served.api(project, "runs/search", method="POST",
                            body={"experiment_ids": ["1"], "page_token": "a\x00b"})) == bad_request
    assert plain(served.api(project, "runs/search", method="POST", body=b'{"experiment_ids": ["\xff"]}')) \
        == bad_request
    assert plain(served.api(project, "runs/search", method="POST",
                            body=b'{"experiment_ids": ["\\ud800"]}')) == bad_request
    assert plain(served.request("GET", f"/api/v4/projects/{project}%00/ml/mlflow/api/2.0/mlflow/experiments/list")) \
        == bad_request
    assert plain(served.request("GET", f"/api/v4/projects/{project}%FF/ml/mlflow/api/2.0/mlflow/experiments/list")) \
        == bad_request

    # and what is well-formed passes: UTF-8 in query and body, a NUL-free name with every odd character
    for name in db.rows("SELECT project_id, name FROM ml_experiments WHERE name !~ '^[a-z_ ]*$' LIMIT 20"):
        found = served.api(name[0], "experiments/get-by-name", query="experiment_name=" + quote(name[1], safe=""))
        assert found[0] == 200 and json.loads(found[2])["experiment"]["name"] == name[1], name
        found = served.api(name[0], "experiments/get-by-name", query="experiment_name=x",
                           method="POST", body={"experiment_name": name[1]})
        assert found[0] == 403  # a POST there is a write: read-only

    # JsonValidation: too deep, before Python's recursion limit and far past it
    for depth in (33, 100_000):
        deep = b"[" * depth + b"]" * depth
        assert error(served.api(project, "runs/search", method="POST", body=b'{"a": ' + deep + b"}")) \
            == (400, {"error": "Parameters nested too deeply"})
    assert served.api(project, "runs/search", method="POST",
                      body=b'{"experiment_ids": ["1"], "a": ' + b"[" * 31 + b"]" * 31 + b"}")[0] != 400

    # Grape's declared types
    for body, name in ((b'{"experiment_ids": {"0": "1"}}', "experiment_ids"),
                       (b'{"experiment_ids": "1"}', "experiment_ids"),
                       (b'{"experiment_ids": 1}', "experiment_ids"),
                       (b'{"experiment_ids": ["1"], "max_results": "ten"}', "max_results"),
                       (b'{"experiment_ids": ["1"], "max_results": [5]}', "max_results"),
                       (b'{"experiment_ids": ["1"], "max_results": true}', "max_results"),
                       (b'{"experiment_ids": ["1"], "max_results": 1e400}', "max_results"),
                       (b'{"experiment_ids": ["1"], "page_token": {"k": 1}}', "page_token")):
        assert error(served.api(project, "runs/search", method="POST", body=body)) \
            == (400, {"error": f"{name} is invalid"}), body
    assert error(served.api(project, "runs/get", query=f"run_id[]={eid}")) == (400, {"error": "run_id is invalid"})

    # what GitLab takes: a JSON body that is no object carries no parameters; huge integers
    for body in (b"[1, 2]", b'"text"', b"5", b"null"):
        assert served.api(project, "experiments/search", method="POST", body=body)[0] == 200, body
    status, _, answer = served.api(project, "experiments/search", method="POST",
                                   body=b'{"max_results": ' + b"9" * 4000 + b"}")
    assert status == 200 and len(json.loads(answer)["experiments"]) <= 5
    assert served.api(project, "experiments/search", method="POST", body={"max_results": "9" * 5000})[0] == 200
    assert served.api(project, "experiments/get", query="experiment_id=" + "9" * 5000)[0] in (400, 404)

    # forged page tokens: any value, any shape, never a 5xx
    for k in (["x", 1], [{"a": 1}, 1], [[1], 1], [True, 1], ["2024-01-01", 2**80], ["a\x00", 1], [1.5, 1], [None, 1]):
        for order in ("created_at DESC", "name ASC", "id DESC"):
            token = base64.urlsafe_b64encode(json.dumps({"o": order, "k": k}).encode()).decode()
            status = served.api(project, "runs/search", method="POST",
                                body={"experiment_ids": ["1"], "order_by": order, "page_token": token})[0]
            assert 400 <= status < 500 or status == 200, (k, order, status)


JSON_LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))


def _json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


JSON_VALUES = st.recursive(JSON_LEAVES, _json_containers, max_leaves=12)
NAMES = st.sampled_from(["experiment_id", "experiment_name", "experiment_ids", "run_id", "run_uuid", "metric_key",
                         "max_results", "order_by", "page_token", "name", "filter", "version", "alias"]) | st.text(max_size=10)
ENDPOINTS = st.sampled_from(["experiments/get", "experiments/get-by-name", "experiments/search", "experiments/list",
                             "runs/get", "runs/search", "metrics/get-history", "registered-models/get",
                             "registered-models/get-latest-versions", "registered-models/search",
                             "model-versions/get", "runs/create", "runs/log-batch", "no/such-endpoint"])
FORGED_TOKENS = st.builds(lambda order, k: base64.urlsafe_b64encode(json.dumps({"o": order, "k": k}).encode()).decode(),
                          st.sampled_from(["created_at DESC", "created_at ASC", "name ASC", "id DESC", "x"]),
                          st.lists(JSON_LEAVES, min_size=0, max_size=3))


@st.composite
def hostile_requests(draw, valid: dict[str, tuple[str, str, dict]]) -> tuple[str, str, bytes | None]:
    """A request to any endpoint with any method. Most start from a valid one (project,
    method and parameters that answer 200) with some values replaced by random JSON,
    forged page tokens or another endpoint's values, so that the endpoints get past their
    first lookup; the rest are random through and through."""
    endpoint = draw(ENDPOINTS)
    project, method, params = valid.get(endpoint, ("1", "GET", {}))
    params = dict(params)
    if draw(st.integers(0, 3)) == 0:
        project = draw(st.sampled_from(["999999", "-1", "0", "9" * 30]) | st.text(max_size=12))
    if draw(st.integers(0, 3)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]))
    for name in draw(st.lists(NAMES, max_size=3)):
        params[name] = draw(JSON_VALUES | FORGED_TOKENS)
    path = f"/api/v4/projects/{quote(project, safe='', errors='surrogatepass')}/ml/mlflow/api/2.0/mlflow/{endpoint}"
    how = draw(st.sampled_from(["json", "query", "raw"]) if method != "GET" else st.sampled_from(["query", "raw"]))
    if how == "query":
        query = "&".join(f"{quote(k, safe='[]', errors='surrogatepass')}="
                         f"{quote(v if isinstance(v, str) else json.dumps(v), safe='', errors='surrogatepass')}"
                         for k, v in params.items())
        return method, f"{path}?{query}", None
    if how == "raw":
        return method, path, draw(st.binary(max_size=200))
    body = draw(st.sampled_from([params, list(params.values()), params.get("name", 1)]))
    return method, path, json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_never_a_5xx(served, valid, data):
    method, path, body = data.draw(hostile_requests(valid))
    status, _, _ = served.request(method, path, body, {"Content-Type": "application/json"})
    event(f"status {status}")  # pytest --hypothesis-show-statistics: how far requests got
    assert status < 500, (method, path, body)


@pytest.fixture(scope="module")
def valid(db) -> dict[str, tuple[str, str, dict]]:
    """For each endpoint a project, method and parameters that answer 200."""
    project, iid, name = db.rows("""SELECT e.project_id, e.iid, e.name FROM ml_experiments e
                                    JOIN ml_candidates c ON c.experiment_id = e.id ORDER BY e.id LIMIT 1""")[0]
    eid, key = db.rows("""SELECT c.eid, m.name FROM ml_candidates c JOIN ml_candidate_metrics m ON m.candidate_id = c.id
                          WHERE c.experiment_id = (SELECT id FROM ml_experiments WHERE project_id = :p AND iid = :i)
                          LIMIT 1""", p=project, i=iid)[0]
    model = db.rows("SELECT project_id, name FROM ml_models ORDER BY id LIMIT 1")[0]
    p = str(project)
    return {"experiments/get": (p, "GET", {"experiment_id": str(iid)}),
            "experiments/get-by-name": (p, "GET", {"experiment_name": name}),
            "experiments/search": (p, "POST", {"max_results": 2, "order_by": "name ASC"}),
            "experiments/list": (p, "GET", {}),
            "runs/get": (p, "GET", {"run_id": str(eid)}),
            "runs/search": (p, "POST", {"experiment_ids": [str(iid)], "max_results": 2}),
            "metrics/get-history": (p, "GET", {"run_id": str(eid), "metric_key": key}),
            "registered-models/get": (str(model[0]), "GET", {"name": model[1]})}


def test_after_the_fuzz_the_server_still_answers_and_said_no_traceback(served, db):
    project, eid = run_of(db)
    assert served.api(project, "runs/get", query=f"run_id={eid}")[0] == 200
    assert "Traceback" not in served.stderr
    assert "failed:" not in served.stderr  # no request met a bug


# -- Host, external URL, access log ---------------------------------------------------------

def test_uris_use_the_external_url_never_the_host_header(served, db):
    uris = []
    for project, eid in db.rows("""SELECT c.project_id, c.eid FROM ml_candidates c
                                   JOIN ml_experiments e ON e.id = c.experiment_id
                                   WHERE c.package_id IS NOT NULL ORDER BY c.id LIMIT 20"""):
        status, _, body = served.api(project, "runs/get", query=f"run_id={eid}",
                                     headers={"Host": "evil.example:666", "X-Forwarded-Host": "evil.example"})
        assert status == 200 and b"evil" not in body
        uris.append(json.loads(body)["run"]["info"]["artifact_uri"])
    urls = [uri for uri in uris if "://" in uri]
    assert urls and all(uri.startswith(f"{EXTERNAL}/api/v4/projects/") for uri in urls), urls[:3]


def test_a_bad_external_url_is_one_line_and_a_usage_error(db):
    for bad in ("ftp://example.com", "example.com", "http://", "http://user:pw@example.com",
                "http://example.com/?q=1", "http://example.com:notaport", "http://exa mple.com"):
        done = subprocess.run([sys.executable, "-m", "toolkit", "--database-url", db.url_text, "mlflow", "serve",
                               "--port", "0", "--external-url", bad], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (bad, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --external-url"), (bad, done.stderr)


def test_one_access_log_line_per_request_and_never_a_token(served, db):
    project, eid = run_of(db)
    marker = f"/marker-{uuid.uuid4().hex}"
    run_line = f"/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/runs/get?run_id=…&*=… 200 "
    runs_before = sum(run_line in line for line in served.stderr.splitlines())
    for _ in range(3):
        assert served.request("GET", marker, headers={"Authorization": f"Bearer {SECRET}"})[0] == 404
    assert served.api(project, "runs/get", query=f"run_id={eid}&private_token={SECRET}",
                      headers={"Authorization": f"Bearer {SECRET}", "PRIVATE-TOKEN": SECRET})[0] == 200
    assert served.api(project, "runs/search", method="POST", body=b'{"x": ' + b"[" * 40 + b"]" * 40 + b"}",
                      headers={"Authorization": f"Bearer {SECRET}"})[0] == 400
    with socket.create_connection((served.host, served.port), timeout=30) as sock:  # refused by waitress
        sock.sendall(f"POST {marker}-big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n"
                     f"Content-Length: {100 * MB}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")

    def lines(text: str) -> list[str]:
        return [line for line in served.stderr.splitlines() if text in line]

    wait_for(lambda: len(lines(marker)) >= 4 and len(lines(run_line)) > runs_before,
             "access log lines did not appear")
    marked = lines(marker)
    assert len(marked) == 4, marked
    pattern = re.compile(rf"^access: GET {marker} 404 \d+ ms user=- client=127\.0\.0\.1$")
    assert all(pattern.match(line) for line in marked[:3]), marked
    assert re.match(rf"^access: POST {marker}-big 413 \d+ ms user=- client=127\.0\.0\.1$", marked[3]), marked
    run_lines = lines(run_line)
    assert len(run_lines) == runs_before + 1, run_lines
    assert SECRET not in served.stderr and eid not in "".join(run_lines)


def test_clients_that_leave_mid_answer_leave_no_traceback(served, db):
    project, eid = run_of(db)
    requests = [f"GET /api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/experiments/list HTTP/1.1\r\nHost: x\r\n\r\n",
                f"GET /api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/runs/get?run_id={eid} HTTP/1.1\r\n"
                "Host: x\r\n\r\n"] * 20
    for number, text in enumerate(requests):
        sock = socket.create_connection((served.host, served.port), timeout=30)
        sock.sendall(text.encode() * 3)  # pipelined: answers still being written when it leaves
        if number % 2:
            sock.recv(10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # leave with a reset
        sock.close()
    marker = f"/after-{uuid.uuid4().hex}"
    assert served.request("GET", marker)[0] == 404
    wait_for(lambda: marker in served.stderr, "the access log line of the request after them")
    assert "Traceback" not in served.stderr and "Exception" not in served.stderr
    assert os.path.exists(f"/proc/{served.process.pid}")


def test_head_answers_a_gets_headers_without_its_body(served, db):
    project, eid = run_of(db)
    path = f"/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/runs/get?run_id={eid}"
    connection = http.client.HTTPConnection(served.host, served.port, timeout=30)
    try:
        connection.request("GET", path)
        got = connection.getresponse()
        body = got.read()
        connection.request("HEAD", path)  # on the same connection: no stray body in between
        head = connection.getresponse()
        assert (head.status, head.read()) == (200, b"")
        assert head.getheader("Content-Length") == str(len(body)) == got.getheader("Content-Length")
        connection.request("GET", path)
        again = connection.getresponse()
        assert (again.status, again.read()) == (200, body)
    finally:
        connection.close()
