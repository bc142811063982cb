"""Conventions every command keeps: the global options are accepted before or after the
subcommand, a closed pipe (``| head``) ends the command quietly, and a database that is
not GitLab's is refused (exit 3) by every command that reads one, fingerprint included."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import own_schema_exists, toolkit

from toolkit.cli import main
from toolkit.cli.main import cli
from toolkit.errors import EXIT_CODE_MEANINGS, ExitCode


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def _global_options() -> list[click.Option]:
    """The root's options that every subcommand accepts too (not --help, not --version)."""
    ctx = click.Context(cli, info_name="toolkit")
    return [p for p in cli.get_params(ctx) if isinstance(p, click.Option) and not p.is_eager]


def _commands(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1] if path else "toolkit")
        for name in command.list_commands(ctx):
            yield from _commands(command.get_command(ctx, name), (*path, name))


# -- global options anywhere -------------------------------------------------------------

def test_the_examples_of_the_help_with_json_after_the_subcommand_work(realistic_db):
    """`toolkit verify milestone-1 --json`, `toolkit status --json`, `toolkit archive status
    --json`, as the help says, mean exactly what they mean with --json first."""
    env = {"TOOLKIT_DATABASE_URL": realistic_db.url_text}
    for args in (("status",), ("verify", "milestone-1"), ("archive", "status"),
                 ("plan", "milestone-1", "--no-sql"), ("history", "--limit", "5")):
        after = run(*args, "--json", env=env)
        before = run("--json", *args, env=env)
        assert after.exit_code == before.exit_code != ExitCode.USAGE, (args, after.output)
        assert after.exit_code in (0, 1), (args, after.output)
        doc = json.loads(after.stdout)
        assert doc["exit_code"] == after.exit_code and doc["command"] == args[0]
        assert doc == json.loads(before.stdout), args


def test_every_global_option_is_accepted_after_the_subcommand(realistic_db):
    url = realistic_db.url_text
    quiet = run("plan", "milestone-1", "-q", "--database-url", url)
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == ""
    assert run("plan", "milestone-1", "--quiet", f"--database-url={url}").stdout == ""
    status = run("status", "--database-url", url, "--read-timeout", "30", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["ok"] is True
    # the last one given wins, wherever it is
    assert run("--database-url", "postgresql://nobody@127.0.0.1:1/x", "status", "--database-url",
               url).exit_code == 0


def test_global_options_after_a_nested_subcommand(sandbox_dir):
    status = run("sandbox", "status", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["result"]["running"] is False
    elsewhere = sandbox_dir / "elsewhere"
    status = run("sandbox", "--data-dir", str(elsewhere), "status", "-q", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["result"]["data_dir"] == str(elsewhere)


def test_each_global_option_is_moved_ahead_whatever_it_is(tmp_path):
    """Derived from the root's own options, so one added later (--gitlab-config) works too."""
    existing = tmp_path / "some.file"
    existing.write_text("")
    for option in _global_options():
        if option.is_flag:
            tail: list[str] = [option.opts[-1]]
        else:
            numeric = isinstance(option.type, (click.types.IntParamType, click.types.FloatParamType))
            tail = [option.opts[-1], "7" if numeric else str(existing)]
        ctx = click.Context(cli, info_name="toolkit")
        assert main.global_options_first(cli, ctx, ["history", *tail]) == [*tail, "history"]
        assert main.global_options_first(cli, ctx, ["archive", "status", *tail, "--", *tail]) == [
            *tail, "archive", "status", "--", *tail]
        if option.expose_value:
            ctx = cli.make_context("toolkit", ["history", *tail])
            expected = True if option.is_flag else option.type_cast_value(ctx, tail[1])
            assert ctx.params[option.name] == expected, option.name


def test_the_docs_say_global_options_go_before_or_after_the_subcommand():
    section = (Path(__file__).parents[1] / "docs" / "output.md").read_text()
    assert "before or after the subcommand" in section
    for option in _global_options():
        assert any(f"`{name}`" in section for name in option.opts), option.opts


def test_no_subcommand_has_an_option_named_like_a_global_one():
    """A global option after a subcommand is the root's only because no subcommand has one
    of the same name (the hoisting leaves a subcommand's own options alone anyway)."""
    names = {name for o in _global_options() for name in (*o.opts, *o.secondary_opts)}
    assert {"--json", "-q", "--quiet", "--database-url", "--read-timeout"} <= names
    for path, command in _commands(cli):
        if not path:
            continue
        own = {name for p in command.params if isinstance(p, click.Option)
               for name in (*p.opts, *p.secondary_opts)}
        assert not own & names, (path, own & names)


def test_double_dash_and_option_values_that_look_like_global_options(realistic_db, tmp_path,
                                                                     monkeypatch):
    url = realistic_db.url_text
    # after `--`, --json is an argument: a milestone of that name, which does not exist
    result = run("--database-url", url, "plan", "--", "--json")
    assert result.exit_code == ExitCode.USAGE
    assert "Unknown milestone '--json'" in result.output and not result.stdout.startswith("{")
    # the value of a subcommand's option, even one spelled like a global option
    monkeypatch.chdir(tmp_path)
    result = run("--database-url", url, "fingerprint", "--out", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "--json").is_file() and "Wrote the fingerprint to --json" in result.stdout
    # the value of a global option, even one spelled like an option: as Click reads it first
    first = run("--database-url", "--json", "status")
    after = run("status", "--database-url", "--json")
    assert (after.exit_code, after.output) == (first.exit_code, first.output)
    assert not after.stdout.startswith("{")
    # a global option without its value is a usage error, not a value taken from elsewhere
    missing = run("status", "--database-url")
    assert missing.exit_code == ExitCode.USAGE
    assert "requires an argument" in missing.output


# -- a closed pipe -----------------------------------------------------------------------

def _into_head(db, args: list[str], lines: int) -> tuple[int, str, str]:
    """``toolkit ARGS | head -n LINES`` with real processes.

    The pipe holds one page (4 KiB), so output written line by line beyond about 8 KiB
    finds head gone and fails with EPIPE every time, rather than fitting in the pipe before
    head exits. (A single large write that head leaves half-read returns short instead of
    failing: the next write is the one that fails.) ``head -n 0`` exits without reading, and
    is waited for: the reader is gone before the first write.
    """
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    head = subprocess.Popen([shutil.which("head") or "head", "-n", str(lines)], stdin=read_end,
                            stdout=subprocess.PIPE, text=True)
    os.close(read_end)
    if lines == 0:
        head.wait(timeout=60)
    env = {**os.environ, "TOOLKIT_DATABASE_URL": db.url_text}
    env.pop("TOOLKIT_DEBUG", None)
    process = subprocess.Popen([sys.executable, "-m", "toolkit", *args], stdout=write_end,
                               stderr=subprocess.PIPE, text=True, env=env)
    os.close(write_end)
    shown = head.communicate(timeout=120)[0]
    error = process.communicate(timeout=120)[1]
    return process.returncode, shown, error


def test_a_closed_pipe_ends_quietly(realistic_db):
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    # 20 runs with a long error each: `history` prints well over 8 KiB
    realistic_db.execute("""
        INSERT INTO toolkit.runs (command, milestone, database_user, toolkit_version, outcome,
                                  finished_at, error)
        SELECT 'toolkit migrate milestone-1', 'milestone-1', current_user, 'test', 'failed', now(),
               repeat('a long error message ', 60)
        FROM generate_series(1, 20)""")
    # Output through toolkit.output: the command carries on to its end and its own exit
    # code. A plain click.echo (sql): the command ends there, 141 as for SIGPIPE.
    for args, lines, exit_code in ((["history"], 1, 0), (["plan"], 2, 0), (["plan", "--json"], 0, 0),
                                   (["status"], 0, 0), (["fingerprint"], 0, 0),
                                   (["sql", "milestone-1"], 0, ExitCode.PIPE_CLOSED)):
        code, shown, error = _into_head(realistic_db, args, lines)
        assert len(shown.splitlines()) == lines, (args, shown)
        said = [line for line in error.splitlines() if not line.startswith("Using the database")]
        assert said == [], (args, error)  # which database, on stderr: nothing else
        assert code == exit_code, (args, code)


def test_every_exit_code_is_in_the_one_table_the_help_and_the_docs_show():
    """141 (a closed pipe) included: the codes are ExitCode's, each with its meaning, and
    `toolkit --help` and docs/output.md's table list exactly those."""
    assert ExitCode.PIPE_CLOSED == 141
    assert set(EXIT_CODE_MEANINGS) == set(ExitCode)
    shown = run("--help").output
    for code, meaning in EXIT_CODE_MEANINGS.items():
        assert f"{int(code):>3}  {meaning}" in shown, code
    listed = re.findall(r"^  +(\d+)  ", shown.split("Exit codes:")[1], re.MULTILINE)
    assert sorted(map(int, listed)) == sorted(map(int, ExitCode))
    table = (Path(__file__).parents[1] / "docs" / "output.md").read_text()
    in_docs = re.findall(r"^\| (\d+) \|", table, re.MULTILINE)
    assert sorted(map(int, in_docs)) == sorted(map(int, ExitCode))


def test_a_closed_pipe_does_not_hide_errors(empty_db):
    """Only the output is given up: a refusal is still said on stderr, with its exit code."""
    code, shown, error = _into_head(empty_db, ["plan"], 0)
    assert code == ExitCode.REFUSED and "does not look like GitLab's database" in error
    using, refused = error.splitlines()  # which database (stderr, as every command says it), then why
    assert using.startswith("Using the database") and refused.startswith("error: ") and shown == ""


# -- not GitLab's database ---------------------------------------------------------------

def test_fingerprint_refuses_a_database_that_is_not_gitlabs(empty_db, tmp_path):
    out_file = tmp_path / "fp.json"
    for args in (["fingerprint"], ["fingerprint", "--out", str(out_file)]):
        result = toolkit(empty_db, *args)
        assert result.exit_code == ExitCode.REFUSED, (args, result.output)
        assert "does not look like GitLab's database" in result.output
        assert "computed from" not in result.output and "Traceback" not in result.output
    assert not out_file.exists()
    result = toolkit(empty_db, "fingerprint", "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == doc["exit_code"] == ExitCode.REFUSED and doc["ok"] is False
    assert doc["error"]["kind"] == "PreconditionRefused"


@pytest.mark.parametrize("args", [["fingerprint", "--compare", "{ref}"],
                                  ["fingerprint", "--compare", "{ref}", "--mlflow-only"]])
def test_fingerprint_compare_refuses_a_database_that_is_not_gitlabs(realistic_db, empty_db, tmp_path,
                                                                   args):
    reference = tmp_path / "ref.json"
    assert toolkit(realistic_db, "fingerprint", "--out", str(reference)).exit_code == 0
    result = toolkit(empty_db, *[a.format(ref=reference) for a in args])
    assert result.exit_code == ExitCode.REFUSED, result.output
    assert "does not look like GitLab's database" in result.output


# Every command that reads a database, as run on one that is not GitLab's. sql connects to
# nothing; sandbox and demo use the sandbox, never the database given.
NOT_GITLAB_ARGS = {
    ("status",): ["status"],
    ("plan",): ["plan"],
    ("migrate",): ["migrate", "milestone-1", "--dry-run"],
    ("verify",): ["verify"],
    ("rollback",): ["rollback", "milestone-1"],
    ("history",): ["history"],
    ("fingerprint",): ["fingerprint"],
    ("archive", "status"): ["archive", "status"],
    ("archive", "drop"): ["archive", "drop", "--yes"],
    ("report", "candidates"): ["report", "candidates", "--project", "1", "--model", "m", "--metric", "loss"],
    ("mlflow", "serve"): ["mlflow", "serve", "--port", "0"],
    ("adopt",): ["adopt", "--yes"],
    ("control", "pause"): ["control", "pause"],
    ("control", "resume"): ["control", "resume"],
    ("control", "abort"): ["control", "abort"],
    ("control", "unpostpone"): ["control", "unpostpone"],
    ("control", "set"): ["control", "set", "batch-size=10"],
}
NO_DATABASE = {("sql",), ("demo",)}
# `toolkit fleet` reads the inventory's databases, never --database-url (a database that is
# not GitLab's is a row or a job with exit 3: tests/test_fleet_plan.py, test_fleet_pipeline.py)
NO_DATABASE |= {("fleet", name) for name in ("plan", "pipeline", "job", "report", "k8s-job")}


def test_every_command_refuses_a_database_that_is_not_gitlabs(empty_db):
    """One line on stderr, exit 3, the same message whichever command, nothing written."""
    leaves = {path for path, command in _commands(cli)
              if path and not isinstance(command, click.Group) and path[0] != "sandbox"}
    assert leaves - NO_DATABASE == set(NOT_GITLAB_ARGS), "a command is missing here"
    variants = [*NOT_GITLAB_ARGS.values(), ["verify", "milestone-1"], ["migrate", "milestone-1"],
                ["history", "--limit", "5"]]
    for args in variants:
        result = toolkit(empty_db, *args)
        assert result.exit_code == ExitCode.REFUSED, (args, result.output)
        said = [line for line in result.stderr.splitlines() if not line.startswith("Using the database")]
        assert len(said) == 1, (args, result.stderr)
        assert f"Database '{empty_db.name}' has no table " in result.stderr, (args, result.stderr)
        assert "does not look like GitLab's database" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output
        as_json = toolkit(empty_db, "--json", *args)
        doc = json.loads(as_json.stdout)
        assert as_json.exit_code == doc["exit_code"] == ExitCode.REFUSED, (args, as_json.output)
        assert doc["error"]["kind"] == "PreconditionRefused", (args, doc)
    assert not own_schema_exists(empty_db)


def test_a_gitlab_database_the_toolkit_never_saw_is_read_as_such(legacy_db):
    """GitLab's tables and nothing of the toolkit's: the read commands answer (exit 0) and
    write nothing, the report says what it waits for."""
    history = toolkit(legacy_db, "history")
    assert history.exit_code == 0, history.output
    assert "No runs recorded yet." in history.stdout
    for args in (["status"], ["plan"], ["verify"], ["archive", "status"],
                 ["migrate", "milestone-1", "--dry-run"]):
        result = toolkit(legacy_db, *args)
        assert result.exit_code == 0, (args, result.output)
    assert "milestone-1: not started (not checked)" in toolkit(legacy_db, "verify").stdout
    report = toolkit(legacy_db, "report", "candidates", "--project", "1", "--model", "m")
    assert report.exit_code == ExitCode.REFUSED and "no model_id yet" in report.stderr, report.output
    assert not own_schema_exists(legacy_db)
    # A column GitLab changed: what reads GitLab's tables refuses; the toolkit's own records
    # (history, the archive) stay readable, their tables being GitLab's all the same.
    legacy_db.execute("ALTER TABLE packages_packages ALTER COLUMN package_type TYPE integer")
    assert "schema differs" in toolkit(legacy_db, "status").stderr
    for args in (["history"], ["archive", "status"]):
        assert toolkit(legacy_db, *args).exit_code == 0, args
