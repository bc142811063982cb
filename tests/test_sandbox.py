"""`toolkit sandbox` start/stop/restart/status/url/seed, through the CLI as an operator uses it."""

from __future__ import annotations

import json
import os

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from toolkit.cli.main import cli
from toolkit.db import create_engine
from toolkit.errors import ExitCode

# libpq's variables that name a server: the toolkit honours them before the sandbox.
LIBPQ_SERVER = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_start_stop_restart_keeps_data(sandbox_dir):
    status = json.loads(run("--json", "sandbox", "status").output)
    assert status["result"]["running"] is False and status["result"]["initialized"] is False

    started = run("sandbox", "start")
    assert started.exit_code == 0, started.output
    assert "Started the sandbox server" in started.output
    assert "Created the empty database gitlab_sandbox" in started.output

    again = run("sandbox", "start")
    assert again.exit_code == 0 and "already running" in again.output

    url = run("sandbox", "url").output.strip()
    assert url.startswith("postgresql://postgres@/gitlab_sandbox?host=")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE kept (x int)"))
        conn.execute(sa.text("INSERT INTO kept VALUES (42)"))
    engine.dispose()

    assert run("sandbox", "stop").exit_code == 0
    stopped = json.loads(run("--json", "sandbox", "status").output)["result"]
    assert stopped["running"] is False and stopped["initialized"] is True
    assert "was not running" in run("sandbox", "stop").output

    url_when_stopped = run("sandbox", "url")
    assert url_when_stopped.exit_code == 3
    assert "toolkit sandbox start" in url_when_stopped.output

    assert run("sandbox", "start").exit_code == 0
    engine = create_engine(run("sandbox", "url").output.strip())
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT x FROM kept")).scalar() == 42
    engine.dispose()


def test_seed_starts_the_sandbox_and_reports_counts(sandbox_dir):
    result = run("--json", "sandbox", "seed", "--scale", "small", "--profile", "adversarial", "--seed", "3")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["ok"] is True and doc["command"] == "sandbox seed"
    counts = doc["result"]["counts"]
    assert counts["ml_candidates"] > 240 and counts["ml_experiments"] > 24
    engine = create_engine(run("sandbox", "url").output.strip())
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ml_candidates")).scalar() == counts["ml_candidates"]
    engine.dispose()
    # seeding again replaces the database rather than adding to it
    again = json.loads(run("--json", "sandbox", "seed", "--seed", "3").output)["result"]["counts"]
    assert again["ml_candidates"] < counts["ml_candidates"]
    # the benchmark's variant: the same data with a tenth of the metric rows
    fewer = json.loads(run("--json", "sandbox", "seed", "--seed", "3", "--metrics-per-candidate", "1")
                       .output)["result"]["counts"]
    assert fewer["ml_candidates"] == again["ml_candidates"]
    assert fewer["ml_candidate_params"] == again["ml_candidate_params"]
    assert 0.5 < fewer["ml_candidate_metrics"] / fewer["ml_candidates"] < 1.5
    assert again["ml_candidate_metrics"] > 5 * fewer["ml_candidate_metrics"]
    bad = run("sandbox", "seed", "--metrics-per-candidate", "0")
    assert bad.exit_code == 2 and "--metrics-per-candidate" in bad.output


@pytest.fixture
def libpq_elsewhere(monkeypatch):
    """A developer's shell or a CI job whose libpq environment names another server; set
    before ``sandbox_dir`` (fixtures are set up in the order a test names them)."""
    for name in LIBPQ_SERVER:
        monkeypatch.setenv(name, {"PGHOSTADDR": "127.0.0.1", "PGPORT": "1"}.get(name, "elsewhere"))


def test_a_libpq_environment_does_not_send_sandbox_tests_elsewhere(libpq_elsewhere, sandbox_dir):
    assert [name for name in LIBPQ_SERVER if name in os.environ] == []
    result = run("status")  # no database given, the sandbox not running: said as such
    assert result.exit_code == ExitCode.REFUSED, result.output
    assert "sandbox is not running" in result.output and "Using " not in result.output
