"""What a new operator meets at the command line: where each line goes (stdout keeps a
command's output, stderr says which database), which source wins, the exit code of a
second runner, usage errors in the toolkit's one-line form (and as JSON), help that shows
what works, and the words and numbers of the messages.

Every command runs against the real test server (or against nothing, where a usage error
is refused before anything connects)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from helpers import toolkit, toolkit_json

from toolkit.cli.main import cli
from toolkit.errors import EXIT_CODE_MEANINGS, ExitCode

ROOT = Path(__file__).parents[1]


def run(*args: str, env: dict | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


# -- 7: `toolkit sql` writes SQL only on stdout, and reads every source of a database --------

def test_sql_rollback_to_a_file_is_sql_only_and_the_database_is_said_on_stderr(realistic_db):
    result = toolkit(realistic_db, "sql", "milestone-4", "--rollback")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("-- "), result.stdout[:200]
    assert "Using " not in result.stdout
    assert result.stderr.startswith("Using the database given by --database-url: "), result.stderr
    assert "none recorded in this database yet" in result.stdout  # it read the database


@pytest.mark.parametrize("source", ["TOOLKIT_DATABASE_URL", "PGDATABASE", "--gitlab-config"])
def test_sql_rollback_reads_every_source_the_other_commands_read(realistic_db, sandbox_dir, tmp_path,
                                                                source):
    """Not only --database-url: TOOLKIT_DATABASE_URL, libpq's environment, database.yml."""
    from toolkit.conninfo import hosts_and_ports

    ((host, port),) = hosts_and_ports(realistic_db.url)
    env: dict[str, str] = {}
    args: list[str] = []
    if source == "TOOLKIT_DATABASE_URL":
        env[source] = realistic_db.url_text
    elif source == "PGDATABASE":
        env.update(PGHOST=host, PGPORT=port or "5432", PGDATABASE=realistic_db.name,
                   PGUSER=realistic_db.url.username or "")
    else:
        config = tmp_path / "database.yml"
        config.write_text(f"production:\n  main:\n    adapter: postgresql\n    host: {host}\n"
                          f"    port: {port or 5432}\n    database: {realistic_db.name}\n"
                          f"    username: {realistic_db.url.username}\n")
        args = ["--gitlab-config", str(config)]
    result = run(*args, "sql", "milestone-4", "--rollback", env=env)
    assert result.exit_code == 0, result.output
    assert "none recorded in this database yet" in result.stdout, result.stdout[-400:]
    assert realistic_db.name in result.stderr and "Using " not in result.stdout


def test_sql_rollback_without_any_database_shows_the_query(sandbox_dir):
    result = run("sql", "milestone-4", "--rollback")
    assert result.exit_code == 0, result.output
    assert "read at run time" in result.stdout and "none recorded" not in result.stdout
    assert result.stderr == ""


# -- 25: the command line wins over the environment ----------------------------------------

def test_an_explicit_gitlab_config_wins_over_a_stray_pghost(realistic_db, sandbox_dir, tmp_path):
    from toolkit.conninfo import hosts_and_ports

    ((host, port),) = hosts_and_ports(realistic_db.url)
    config = tmp_path / "database.yml"
    config.write_text(f"production:\n  main:\n    adapter: postgresql\n    host: {host}\n"
                      f"    port: {port or 5432}\n    database: {realistic_db.name}\n"
                      f"    username: {realistic_db.url.username}\n")
    stray = {"PGHOST": "/nonexistent/socket/dir", "PGDATABASE": "tk_no_such_database"}
    result = run("--gitlab-config", str(config), "status", env=stray)
    assert result.exit_code == 0, result.output
    (using,) = [line for line in result.stderr.splitlines() if line.startswith("Using ")]
    assert str(config) in using and realistic_db.name in using, using
    assert "PGHOST, PGDATABASE in the environment not used: --gitlab-config comes first" in using
    assert "still reads" not in using
    # a file that leaves the host out: libpq fills it from PGHOST when it connects, and says so
    config.write_text(config.read_text().replace(f"    host: {host}\n", ""))
    result = run("--gitlab-config", str(config), "status", env={**stray, "PGHOST": host})
    assert result.exit_code == 0, result.output
    (using,) = [line for line in result.stderr.splitlines() if line.startswith("Using ")]
    assert "PGDATABASE in the environment not used" in using, using
    assert "libpq still reads PGHOST for what the file leaves out (host)" in using, using


# -- 11 and 23: a second runner has its own exit code; docs/ci.md lists every code ---------

RUNNER_LOCK = "SELECT pg_advisory_lock(1953196404, 1)"


def test_a_second_runner_exits_busy_not_as_a_lock_timeout(realistic_db):
    rival = realistic_db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    rival.execute(sa.text("SET application_name = 'toolkit migrate milestone-1'"))
    rival.execute(sa.text(RUNNER_LOCK))
    try:
        code, doc = toolkit_json(realistic_db, "migrate", "milestone-1", "--lock-wait", "0")
    finally:
        rival.close()
    assert code == ExitCode.BUSY == 7 and code != ExitCode.LOCKED, doc
    assert doc["exit_code"] == 7 and doc["ok"] is False and doc["error"]["kind"] == "RunnerBusy", doc
    assert "holds the runner lock" in doc["error"]["problem"]
    assert "busy" in EXIT_CODE_MEANINGS[ExitCode.BUSY]


def test_docs_ci_lists_every_exit_code():
    ci = (ROOT / "docs" / "ci.md").read_text()
    listed = re.findall(r"^\| (\d+) \|", ci, re.MULTILINE)
    assert sorted(map(int, listed)) == sorted(map(int, ExitCode)), listed
    assert "exit code 7" in ci


# -- 16: every usage error is one line, and a JSON document with --json ---------------------

USAGE_MISTAKES = (["migrate", "milestone-1", "--bogus"], ["bogus"], ["--bogus"], ["migrate"],
                  ["status", "extra"], ["archive", "bogus"], ["migrate", "milestone-1", "--batch-size", "0"],
                  ["report", "candidates", "--project", "x", "--model", "m"])


@pytest.mark.parametrize("args", USAGE_MISTAKES, ids=" ".join)
def test_a_usage_error_is_one_line_and_with_json_one_document(sandbox_dir, args):
    text = run(*args)
    assert text.exit_code == ExitCode.USAGE, text.output
    assert text.stdout == "" and "Usage:" not in text.stderr and "Try " not in text.stderr, text.output
    (line,) = text.stderr.splitlines()
    assert line.startswith("error: ") and ". Next: " in line, line
    for given in (["--json", *args], [*args, "--json"]):
        result = run(*given)
        assert result.exit_code == ExitCode.USAGE, result.output
        doc = json.loads(result.stdout)
        assert doc["ok"] is False and doc["exit_code"] == ExitCode.USAGE, doc
        assert doc["error"]["kind"] == "UsageProblem" and doc["error"]["next_step"], doc
        assert f"error: {doc['error']['problem'].rstrip('.')}. Next: " in result.stderr


# -- 17: --json in a terminal: refused because --json cannot prompt -------------------------

def test_milestone_4_with_json_in_a_terminal_says_json_cannot_prompt(before_milestone):
    import os
    import pty
    import subprocess
    import sys

    db = before_milestone(4)
    primary, secondary = pty.openpty()  # stdin is a real terminal
    env = {**os.environ, "TOOLKIT_DATABASE_URL": db.url_text}
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "migrate", "milestone-4", "--json"],
                               env=env, stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    os.close(secondary)
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        os.close(primary)
    assert process.returncode == ExitCode.REFUSED, stderr
    doc = json.loads(stdout)
    error = doc["error"]
    assert "--json cannot ask for" in error["problem"], error
    assert "in a terminal" not in error["next_step"] and "pass --yes with --json" in error["next_step"], error
    assert error["details"]["confirmation"] == "--yes"
    assert db.scalar("SELECT to_regclass('ml_experiments') IS NOT NULL")


# -- 18: history keeps the problem, never the driver's internals, whatever path stored it ---

def test_history_never_keeps_sqlalchemy_internals_from_any_path(realistic_db):
    from sqlalchemy.exc import DBAPIError, StatementError

    from toolkit.engine.events import LOGGED
    from toolkit.engine.history import RunHistory, error_text
    from toolkit.engine.settings import RunOptions

    db = realistic_db
    try:  # not a driver error: SQLAlchemy's own, with its statement dump and link
        with db.engine.connect() as conn:
            conn.execute(sa.text("SELECT id FROM projects WHERE id = :missing"))
    except StatementError as exc:
        unbound = exc
    assert not isinstance(unbound, DBAPIError)
    said = error_text(unbound)
    assert said == "StatementError: A value is required for bind parameter 'missing'", said
    try:  # a driver error quoted inside a toolkit message (as a closing verify's is)
        with db.engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table WHERE id = :i"), {"i": 7})
    except DBAPIError as exc:
        quoted = f"milestone-1 is applied, but its closing verify did not finish: {exc}. Next: run verify"
    assert "[SQL: " in quoted and "Background on this error at" in quoted
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    run_id = db.scalar("SELECT max(id) FROM toolkit.runs")
    RunHistory(db.engine, RunOptions(), LOGGED).record_end(run_id, "failed", {}, quoted)
    stored = db.scalar("SELECT error FROM toolkit.runs WHERE id = :i", i=run_id)
    assert stored == ('milestone-1 is applied, but its closing verify did not finish: relation '
                      '"no_such_table" does not exist. Next: run verify'), stored
    code, doc = toolkit_json(db, "history")
    assert code == 0 and "[SQL" not in json.dumps(doc) and "sqlalche.me" not in json.dumps(doc)


# -- 21: a metric no candidate has is said, not silently ignored ------------------------------

def test_report_candidates_warns_of_a_metric_no_candidate_has(before_milestone):
    db = before_milestone(3, "realistic")  # milestone 2 applied: candidates have their model_id
    project_id, name = db.rows("""
        SELECT m.project_id, m.name FROM ml_models m
        WHERE EXISTS (SELECT 1 FROM ml_candidates c JOIN ml_candidate_metrics x ON x.candidate_id = c.id
                      WHERE c.model_id = m.id) ORDER BY m.id LIMIT 1""")[0]
    args = ("report", "candidates", "--project", str(project_id), "--model", name)
    result = toolkit(db, *args, "--metric", "nosuch")
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert f"no candidate of model {name!r} has a metric 'nosuch'" in warning, warning
    assert "its metrics: " in warning and "none" not in warning.split("its metrics: ")[1]
    code, doc = toolkit_json(db, *args, "--metric", "nosuch")
    assert code == 0 and any("'nosuch'" in w for w in doc["warnings"]), doc.get("warnings")
    known = doc["result"]["metric_names"][0]
    quiet = toolkit(db, *args, "--metric", known)
    assert quiet.exit_code == 0 and "warning:" not in quiet.output


# -- 24: words: one is singular, no jargon, the demo's steps keep their indentation ----------

def test_a_count_of_one_is_singular():
    from toolkit.words import counted

    assert [counted(1, "part"), counted(2, "part"), counted(0, "row")] == ["1 part", "2 parts", "0 rows"]
    assert [counted(1, "batch"), counted(3, "batch"), counted(2, "schema change")] == [
        "1 batch", "3 batches", "2 schema changes"]
    assert counted(1, "experiment") == "1 experiment" and counted(2, "entry") == "2 entries"


def test_verify_says_its_parts_in_words_without_jargon(realistic_db):
    db = realistic_db
    assert toolkit(db, "migrate", "milestone-1").exit_code in (0, 1)
    _, doc = toolkit_json(db, "verify", "milestone-1")
    (mlflow,) = [c for m in (doc.get("result") or doc["error"]["details"]["result"])["milestones"]
                 for c in m["checks"] if c["name"].startswith("the MLflow view")]
    assert "untouched by its runs" not in mlflow["detail"] and "unwritten by" not in mlflow["detail"]
    assert re.match(r"\d+ parts? equal \(", mlflow["detail"]), mlflow["detail"]
    assert not re.search(r"\b1 (parts|rows|candidates|experiments|models|packages)\b", json.dumps(doc))


def test_what_the_engine_says_in_the_demo_is_indented_under_its_step(realistic_db, capsys):
    """`Taking the fingerprint ...` comes from the runner, in the middle of the demo's step 3."""
    from toolkit import milestones, output
    from toolkit.cli.demo import STEP_INDENT, Indented
    from toolkit.engine.runner import Runner
    from toolkit.engine.settings import RunOptions

    output.configure()
    runner = Runner(realistic_db.engine, RunOptions(batch_size=500), plan=milestones.plan(),
                    command="toolkit demo", events=Indented(output.out))
    runner.migrate(milestones.get("milestone-1"))
    said = capsys.readouterr().out.splitlines()
    taking = [line for line in said if "Taking the fingerprint" in line]
    assert taking and all(line.startswith(STEP_INDENT + "Taking the fingerprint") for line in taking), said


# -- 19: a subcommand's help shows the global options, and what MILESTONE may be -------------

def _leaves(command, path=()):
    import click

    if path:
        yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1] if path else "toolkit")
        for name in command.list_commands(ctx):
            yield from _leaves(command.get_command(ctx, name), (*path, name))


def test_every_subcommand_help_shows_the_global_options_and_the_milestones(sandbox_dir):
    import click

    ctx = click.Context(cli, info_name="toolkit")
    globals_ = [p for p in cli.get_params(ctx) if isinstance(p, click.Option) and not p.is_eager]
    with_milestone = set()
    for path, _command in _leaves(cli):
        shown = run(*path, "--help")
        assert shown.exit_code == 0, (path, shown.output)
        section = shown.stdout.split("Global options (before or after the subcommand):")
        assert len(section) == 2, (path, shown.stdout)
        for option in globals_:
            assert option.opts[-1] in section[1], (path, option.opts)
        if "MILESTONE" in shown.stdout.split("\n\n")[0] or "--baseline MILESTONE" in shown.stdout:
            with_milestone.add(path)
            assert "Milestones (MILESTONE):" in shown.stdout, path
            for n in range(1, 5):
                assert f"milestone-{n}, {n} " in shown.stdout, (path, n)
    assert {("migrate",), ("rollback",), ("verify",), ("plan",), ("sql",), ("fingerprint",)} <= with_milestone
    # what the help says works: the alias, the global option after the subcommand
    assert run("sql", "1", "--json").exit_code == 0
    assert json.loads(run("sql", "1", "--json").stdout)["result"]["milestone"] == "milestone-1"


# -- 23: JSON for CI: a stable id per check, ISO 8601 moments, the database named -----------

def test_json_checks_carry_stable_ids_and_moments_are_iso_8601(before_milestone):
    db = before_milestone(3, "realistic")  # milestones 1 and 2 applied
    ids = {}
    for milestone in PINNED_CHECK_IDS:
        code, doc = toolkit_json(db, "verify", milestone)
        assert code == 0, doc
        (checked,) = doc["result"]["milestones"]
        ids[milestone] = [c["id"] for c in checked["checks"]]
        for check in checked["checks"]:
            assert check["name"] and check["id"] != check["name"]  # the prose, kept beside it
    assert ids == PINNED_CHECK_IDS  # a check reworded passes its old id=, never a new one
    # the database, masked; never a password
    assert doc["database"].startswith("postgresql://") and f"/{db.name}" in doc["database"]
    code, history = toolkit_json(db, "history", "--limit", "3")
    assert code == 0
    for run in history["result"]["runs"]:
        for key in ("started_at", "finished_at"):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", run[key]), run[key]


def test_a_check_id_is_the_name_in_stable_words():
    from toolkit.engine.results import Check

    assert Check(name="every candidate's model_id is its experiment's model", ok=True, detail="").id == \
        "every-candidates-model_id-is-its-experiments-model"
    assert Check(name="reworded prose", ok=True, detail="", id="the-old-id").id == "the-old-id"


def test_the_json_database_never_shows_a_password(realistic_db):
    url = realistic_db.url.set(password="s3cr3t-pw").render_as_string(hide_password=False)
    result = run("--json", "--database-url", url.replace("postgresql+psycopg", "postgresql"), "status")
    doc = json.loads(result.stdout)
    assert "s3cr3t-pw" not in result.output and ":***@" in doc["database"], doc["database"]


PINNED_CHECK_IDS: dict[str, list[str]] = {
    "milestone-1": ["no-candidate-linked-generic-packages", "converted-packages-are-still-ml_model",
                    "the-mlflow-view-equals-the-fingerprint-taken-before-milestone-1"],
    "milestone-2": ["ml_candidates-model_id-exists", "index_ml_candidates_on_model_id-is-valid",
                    "trigger_ml_candidates_model_id_transition-is-in-place",
                    "every-candidates-model_id-is-its-experiments-model",
                    "fk_ml_candidates_model_id-is-validated",
                    "the-mlflow-view-equals-the-fingerprint-taken-before-milestone-2",
                    "every-other-ml-table-is-unchanged"],
}


def test_leaving_the_confirmation_prompt_is_a_refusal_not_clicks_aborted(before_milestone):
    """Ctrl-D at milestone 4's prompt: one `error: … Next: …` line and exit 3 (nothing was
    changed), not Click's "Aborted!" with exit 1, which the table says is a failed verify."""
    import os
    import pty
    import subprocess
    import sys

    db = before_milestone(4)
    primary, secondary = pty.openpty()
    env = {**os.environ, "TOOLKIT_DATABASE_URL": db.url_text}
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "migrate", "milestone-4"], env=env,
                               stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(secondary)
    try:
        os.write(primary, b"\x04")  # Ctrl-D: end of input at the prompt
        stdout, stderr = process.communicate(timeout=120)
    finally:
        os.close(primary)
    assert process.returncode == ExitCode.REFUSED, (stdout, stderr)
    assert "Aborted!" not in stdout + stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Not confirmed" in line and ". Next: " in line, line
    assert db.scalar("SELECT to_regclass('ml_experiments') IS NOT NULL")


def test_sql_of_a_rollback_that_reads_nothing_connects_to_nothing(empty_db):
    """Only milestone 4's rebuild is read from the database: milestone 1's rollback script is
    the same everywhere, so even a database that is not GitLab's does not matter."""
    result = run("sql", "milestone-1", "--rollback", env={"TOOLKIT_DATABASE_URL": empty_db.url_text})
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout.startswith("-- ")
