"""`toolkit sandbox` start/stop/restart/status/url/seed, through the CLI as an operator uses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def _process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_the_sandbox_own_psql_and_pg_dump_reach_its_database(sandbox_dir, tmp_path):
    """A system pg_dump older than the sandbox's server (18) refuses it: `toolkit sandbox
    pg_dump` is the server's own, connected to the sandbox's database."""
    not_yet = _process("sandbox", "pg_dump")
    assert not_yet.returncode == ExitCode.REFUSED and "toolkit sandbox start" in not_yet.stderr
    assert run("sandbox", "seed").exit_code == 0
    count = _process("sandbox", "psql", "-At", "-c", "SELECT count(*) FROM ml_experiments")
    assert (count.returncode, count.stdout) == (0, "24\n"), count.stderr
    # the arguments are pg_dump's: a plain dump of one table on stdout, every row in it
    dumped = _process("sandbox", "pg_dump", "--data-only", "-t", "ml_experiments")
    assert dumped.returncode == 0, dumped.stderr
    copy = dumped.stdout.split("COPY public.ml_experiments ")[1].split("\n\\.\n")[0]
    assert len(copy.splitlines()) - 1 == 24
    # the runbook's backup, tested as it says: restored into a scratch database of the sandbox
    backup = tmp_path / "before-toolkit.dump"
    assert _process("sandbox", "pg_dump", "-Fc", "-f", str(backup)).returncode == 0
    assert _process("sandbox", "psql", "-c", "CREATE DATABASE scratch").returncode == 0
    restored = _process("sandbox", "pg_restore", "-d", "scratch", str(backup))
    assert restored.returncode == 0, restored.stderr
    counted = _process("sandbox", "psql", "-d", "scratch", "-At", "-c", "SELECT count(*) FROM ml_candidates")
    assert (counted.returncode, counted.stdout) == (0, "242\n"), counted.stderr
    # pg_dump's own failure is its exit code
    missing = _process("sandbox", "pg_dump", "-t", "no_such_table")
    assert missing.returncode == 1 and "no matching tables" in missing.stderr
    assert _process("--json", "sandbox", "psql").returncode == ExitCode.USAGE


def test_the_help_names_the_sandbox_directory_as_it_is_for_this_user(monkeypatch):
    """As root the default is machine-wide, not "per user"."""
    from toolkit.sandbox.server import MACHINE_WIDE_DIR, _default_without_env

    monkeypatch.delenv("TOOLKIT_SANDBOX_DIR", raising=False)
    shown = "".join(run("sandbox", "--help").output.split())  # as wrapped, without the wrapping
    assert f"else{_default_without_env()}" in shown
    assert "peruser" not in shown
    if os.geteuid() == 0:
        assert f"{MACHINE_WIDE_DIR},machine-wide" in shown
    else:
        assert "yoursalone" in shown


ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


def _section(title: str) -> str:
    return README.read_text().split(f"## {title}\n")[1].split("\n## ")[0]


def _doc(path: str) -> str:
    return (ROOT / path).read_text()


def test_the_docs_seed_times_are_the_benchmark_s():
    """One figure per scale, the one docs/benchmarks/ measured, wherever the docs say it."""
    table = _doc("docs/sandbox.md")
    for scale in ("gitlab-com", "x25"):
        bench = json.loads((ROOT / "docs" / "benchmarks" / f"{scale}.json").read_text())
        row = next(line for line in table.splitlines() if line.startswith(f"| `{scale}` |"))
        assert row.split(" | ")[-1].startswith(f"{bench['seed_seconds']:.1f} s"), (scale, row)
        if scale == "x25":
            assert f"peak {bench['seed_peak_mb']:.1f} MB" in row
            assert f"**x25 sandbox < 3 minutes**: {bench['seed_seconds']:.1f} s." in _doc("docs/benchmarks/README.md")


def test_the_quick_start_says_where_the_sandbox_is_and_how_to_go_on():
    from toolkit.sandbox.server import MACHINE_WIDE_DIR

    quick = _section("Quick start")
    commands = quick.split("```sh\n")[1].split("```")[0].strip().splitlines()
    assert len(commands) == 2, commands
    flat = " ".join(quick.split())
    for said in ("~/.local/share/toolkit/sandbox", f"as root, in `{MACHINE_WIDE_DIR}`",
                 "`TOOLKIT_SANDBOX_DIR=DIR`", "refuses (exit 7", "`.venv/bin/toolkit sandbox stop`",
                 "`. .venv/bin/activate`", "about 20 minutes on 2 cores"):
        assert said in flat, said
    runbook = " ".join(_doc("docs/runbook.md").split())
    assert "toolkit sandbox pg_dump -Fc -f before-toolkit.dump" in runbook
    assert "640 passed" not in _doc("CONTRIBUTING.md").split("## Running the tests\n")[1].split("\n## ")[0]
