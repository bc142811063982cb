"""The CLI as a whole: demo, connection resolution, errors as one line with an exit code."""

from __future__ import annotations

import json
import sys

from click.testing import CliRunner

from toolkit.cli.main import cli
from toolkit.errors import ExitCode, redact


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_demo_runs_the_whole_blueprint_and_comes_back_identical(sandbox_dir, monkeypatch):
    # run as the Quick start runs it, by a path, the venv not activated
    monkeypatch.setattr(sys, "argv", ["/nowhere/venv/bin/toolkit", "demo"])
    result = run("demo")
    assert result.exit_code == 0, result.output
    # what to type next is said as it can be typed, and the sandbox is said to be left running
    last = result.output.splitlines()[-3:]
    assert last[0] == ("Every check held. Go on: `/nowhere/venv/bin/toolkit status`, "
                       "`/nowhere/venv/bin/toolkit plan milestone-1`, `/nowhere/venv/bin/toolkit history`.")
    assert "`. /nowhere/venv/bin/activate`" in last[1]
    assert last[2].startswith("The sandbox is still running (started by the demo, pid ")
    assert last[2].endswith(f"data in {sandbox_dir}); stop it with `/nowhere/venv/bin/toolkit sandbox stop`.")
    assert "full table: /nowhere/venv/bin/toolkit report candidates --project " in result.output
    for milestone in ("milestone-1", "milestone-2", "milestone-3", "milestone-4"):
        assert f"   {milestone}: " in result.output
    assert "checks hold" in result.output and "rolled back" in result.output
    assert "identical: all 12 ML tables and all 12 parts of the MLflow view" in result.output
    assert result.output.count("MLflow view unchanged") == 4
    # what users see change on purpose, from the ledgers: URIs at milestone 1, the registry at 3
    assert "GitLab's artifact_uri changes, as on GitLab: " in result.output
    assert "runs whose artifact_uri milestone-1 changed" in result.output
    assert "registry users see " in result.output and "models milestone-3 created" in result.output
    assert "but " in result.output and "runs' artifact_uri (GitLab's rule, declared)" in result.output
    # two training clients wrote through `mlflow serve --allow-writes` from milestone 1 to the last rollback
    writes = next(line for line in result.output.splitlines() if line.startswith("   MLflow writes: ")
                  and "written" in line)
    assert "written during the migration, all read back" in writes, result.output
    backfilled = next(line for line in result.output.splitlines() if line.startswith("   milestone-2: ")
                      and "rows" in line).split(": ")[1].split()[0]
    assert (f"milestone-2: rolled back: 5 schema changes undone, which took the {backfilled} values it "
            "had written with them") in result.output
    doc = json.loads(run("--json", "demo").output)
    assert doc["ok"] is True and doc["exit_code"] == 0
    assert doc["result"]["counts"]["ml_experiments"] == 24
    assert doc["result"]["round_trip_identical"] is True
    assert [s["stage"] for s in doc["result"]["stages"]] == [
        "migrate milestone-1", "migrate milestone-2", "migrate milestone-3", "migrate milestone-4",
        "rollback milestone-4", "rollback milestone-3", "rollback milestone-2", "rollback milestone-1"]
    assert all(s["ok"] for s in doc["result"]["stages"])
    runs = json.loads(run("--json", "history").output)["result"]["runs"]
    assert [r["command"] for r in reversed(runs)] == [
        f"toolkit demo ({stage['stage']})" for stage in doc["result"]["stages"]]


def test_no_database_and_no_sandbox_is_refused_with_the_next_step(sandbox_dir):
    from toolkit.cli.context import app

    @cli.command("probe-connection", hidden=True)
    def probe() -> None:
        app().target()

    try:
        result = run("probe-connection")
    finally:
        cli.commands.pop("probe-connection")
    assert result.exit_code == ExitCode.REFUSED
    assert "sandbox is not running" in result.output
    assert "toolkit sandbox start" in result.output
    assert "Traceback" not in result.output


def test_unreachable_database_is_one_line_without_the_password(sandbox_dir):
    from toolkit.cli.context import app

    @cli.command("probe-connection", hidden=True)
    def probe() -> None:
        with app().engine().connect():
            pass

    try:
        result = run("--database-url", "postgresql://gitlab:s3cr3t-pw@127.0.0.1:1/gitlabhq_production",
                     "probe-connection")
        as_json = run("--json", "probe-connection",
                      env={"TOOLKIT_DATABASE_URL": "postgresql://gitlab:s3cr3t-pw@127.0.0.1:1/x"})
    finally:
        cli.commands.pop("probe-connection")
    assert result.exit_code == ExitCode.DATABASE
    assert "s3cr3t-pw" not in result.output
    assert "gitlab:***@127.0.0.1:1" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [result.output.strip().splitlines()[-1]]  # one line, the last
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is False and doc["exit_code"] == ExitCode.DATABASE
    assert doc["error"]["kind"] == "DatabaseProblem"
    assert "s3cr3t-pw" not in as_json.output


def test_non_postgres_url_is_a_usage_error(sandbox_dir):
    from toolkit.cli.context import app

    @cli.command("probe-connection", hidden=True)
    def probe() -> None:
        app().target()

    try:
        result = run("--database-url", "mysql://root:pw@localhost/db", "probe-connection")
    finally:
        cli.commands.pop("probe-connection")
    assert result.exit_code == ExitCode.USAGE
    assert "PostgreSQL only" in result.output


def test_redact_masks_passwords_everywhere():
    assert redact("postgresql://u:p%40ss@h/db") == "postgresql://u:***@h/db"
    assert redact("host=h password=hunter2 user=u") == "host=h password=*** user=u"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact("failed for 'topsecret'", ("topsecret",)) == "failed for '***'"


def test_every_command_has_help_with_an_example():
    def walk(group, prefix):
        for name, command in group.commands.items():
            if command.hidden:
                continue
            yield f"{prefix} {name}".strip(), command
            if hasattr(command, "commands"):
                yield from walk(command, f"{prefix} {name}")

    for path, _command in walk(cli, ""):
        result = run(*path.split(), "--help")
        assert result.exit_code == 0
        assert "Example:" in result.output, path



def test_the_command_to_type_next_is_the_one_typed():
    """After `.venv/bin/toolkit demo` a bare `toolkit` is not found: say what was typed."""
    from toolkit.cli.invoked import typed_command

    assert typed_command(".venv/bin/toolkit", which=lambda _: None) == ".venv/bin/toolkit"
    assert typed_command("/usr/local/bin/toolkit", which=lambda _: "/usr/local/bin/toolkit") == "toolkit"
    assert typed_command("/opt/tk/bin/toolkit", which=lambda _: "/usr/local/bin/toolkit") == \
        "/opt/tk/bin/toolkit"
    assert typed_command("toolkit", which=lambda _: "/usr/local/bin/toolkit") == "toolkit"
    module = typed_command("/src/toolkit/__main__.py", which=lambda _: None)
    assert module == f"{sys.executable} -m toolkit"
    from toolkit.cli.demo import _venv_of

    assert _venv_of(".venv/bin/toolkit") == ".venv"
    assert _venv_of("/srv/tk/.venv/bin/python -m toolkit") == "/srv/tk/.venv"
    assert _venv_of("python3 -m toolkit") is None and _venv_of("toolkit") is None
