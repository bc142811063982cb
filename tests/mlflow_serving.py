"""``toolkit mlflow serve`` as a process of its own, and the two ways the registry and
artifact tests talk to it: raw HTTP (to see GitLab's exact documents) and the real MLflow
client in a subprocess (to see what a user's script meets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from typing import Any

from conftest import PREFIX, Database, _create_database, _drop_database
from helpers import resolve_m1_anomalies

from toolkit.db import create_engine

# A Python whose mlflow is a 2.x release (a venv with `pip install mlflow-skinny==2.22.4`),
# as tests/test_mlflow_serve.py takes it. Optional, to spare the suite an install.
MLFLOW2_PYTHON_ENV = "TOOLKIT_TEST_MLFLOW2_PYTHON"
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
_numbers = count()


@contextmanager
def adversarial_database(pg_server, templates, label: str, *, resolved: bool = True) -> Iterator[Database]:
    """A database of its own cloned from the adversarial template; ``resolved``: milestone
    1's blocking anomalies resolved as the runbook says (so the milestones run on it)."""
    name = f"{PREFIX}{label}_{next(_numbers)}"
    _create_database(pg_server, name, templates.get("adversarial:small"))
    database = Database(name, pg_server.url(name), create_engine(pg_server.url(name)))
    if resolved:
        resolve_m1_anomalies(database)
    try:
        yield database
    finally:
        database.engine.dispose()
        _drop_database(pg_server, name)


@contextmanager
def serve_process(db: Database, *args: str, stderr: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """``toolkit mlflow serve ARGS`` on a free port: the process and its http://HOST:PORT.
    Its stderr (an access log line per request) goes to the file ``stderr``: a pipe nobody
    reads would fill and stop the server. Stopped with SIGTERM, which must end it well."""
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "toolkit", "--database-url", db.url_text, "mlflow", "serve", "--port", "0",
             *args], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        address = None
        for line in process.stdout:
            if line.startswith("Serving "):
                address = line.split(" at ")[1].split()[0]
            if line.startswith("Ctrl-C"):
                break
        assert address, stderr.read_text()
        yield process, address
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, stderr.read_text()[-3000:]


@contextmanager
def serving(db: Database, *args: str) -> Iterator[str]:
    """:func:`serve_process`, its log in a directory of its own; the address."""
    with tempfile.TemporaryDirectory() as folder, \
            serve_process(db, *args, stderr=Path(folder) / "stderr.txt") as (_, address):
        yield address


def raw(server: str, project: int | str, endpoint: str, *, query: str = "", body: dict | None = None,
        api: str = "mlflow", method: str | None = None,
        token: str | None = None) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or bytes, headers) of one request (``token``: sent as Bearer)."""
    url = f"{server}/api/v4/projects/{project}/ml/mlflow/api/2.0/{api}/{endpoint}" + (f"?{query}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, payload, headers = answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        status, payload, headers = exc.code, exc.read(), dict(exc.headers)
    if headers.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(payload), headers
    return status, payload, headers


def client(server: str, project: int, code: str, *, python: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``code`` run by the real client, ``c`` an MlflowClient of ``project``; ``say(x)``
    prints one JSON line. ``env`` is added last (e.g. MLFLOW_TRACKING_TOKEN, or retries on)."""
    prelude = ("import json, mlflow\nfrom mlflow import MlflowClient\n"
               "from mlflow.exceptions import MlflowException\nc = MlflowClient()\n"
               "def say(x): print('SAY ' + json.dumps(x, default=str), flush=True)\n")
    return subprocess.run([python or sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **CLIENT_ENV,
                                            "MLFLOW_TRACKING_URI": f"{server}/api/v4/projects/{project}/ml/mlflow",
                                            **(env or {})})


def said(done: subprocess.CompletedProcess) -> list:
    """What ``say`` printed, in order; the process must have ended well."""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("SAY ")]
