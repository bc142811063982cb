"""Every ``Example: toolkit …`` line of every command's help, run as written.

The examples are read from the help as an operator sees it (the whole Click command tree
walked), split like a shell would (``;``, ``&&``, ``"$(…)"``), and run: the database ones
against a realistic small GitLab database, with the milestones each one is about applied
first; the sandbox ones against a sandbox in a temporary directory (TOOLKIT_SANDBOX_DIR).
None may end in a usage error (2) or an internal error (70); each command's exit code is
the one listed below. A new or changed example must be added to EXAMPLES.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from toolkit.cli.main import cli
from toolkit.errors import ExitCode

# Database examples run in this order, each after the setup of its stage (the migrations
# listed, run through the CLI, once). Sandbox examples run in their own order. The codes are
# those of each command the example runs, in order (a "$(…)" runs before its command).
FRESH, M1, M2, M4 = (), ("milestone-1",), ("milestone-2",), ("milestone-3", "milestone-4")
DATABASE_EXAMPLES: dict[str, tuple[tuple[str, ...], list[int]]] = {
    "toolkit status": (FRESH, [0]),
    "toolkit status --watch 5": (FRESH, [0]),  # no run going: said once, exit 0
    "toolkit plan milestone-1 --no-sql --fail-on-blocking": (FRESH, [0]),
    "toolkit migrate milestone-1 --dry-run": (FRESH, [0]),
    "toolkit sql milestone-1 --rollback": (FRESH, [0]),
    "toolkit fingerprint --out before.json; toolkit fingerprint --compare before.json": (FRESH, [0, 0]),
    "toolkit verify milestone-1 --require verified --json": (M1, [0]),
    "toolkit rollback milestone-1 --dry-run": ((), [0]),
    "toolkit rollback milestone-1": ((), [0]),
    "toolkit history --limit 5": ((), [0]),
    # the ledger is in order here: nothing to adopt (test_toolkit_schema_lost.py adopts)
    "toolkit adopt --yes": ((), [3]),
    # no run is going while the examples run: each request is recorded and refused (3)
    'toolkit control pause --reason "vacuum of ci_builds first"': ((), [3]),
    'toolkit control pause --reason "replica rebuild"': ((), [3]),
    "toolkit control resume": ((), [3]),
    'toolkit control abort --reason "change window over"': ((), [3]),
    "toolkit control set target-batch-ms=200": ((), [3]),
    'toolkit control unpostpone --reason "backup verified"': ((), [3]),
    # pricing-tuned-0 is a model of project 1 in the realistic small data (seed 1), with
    # candidates that log loss and accuracy; the report reads it after milestone 2.
    "toolkit report candidates --project 1 --model pricing-tuned-0 --metric accuracy":
        (M1 + M2, [0]),
    "toolkit report candidates --project 1 --model pricing-tuned-0 --metric loss --order asc": ((), [0]),
    "toolkit archive status": (M4, [0]),
    "toolkit archive status --json": ((), [0]),
    "toolkit archive drop --yes": ((), [0]),
}
SANDBOX_EXAMPLES: dict[str, list[int]] = {
    "toolkit sandbox status": [0],
    "toolkit sandbox start": [0],
    "toolkit sandbox start && toolkit sandbox seed --scale gitlab-com": [0, 0],
    "toolkit sandbox seed --scale gitlab-com --profile adversarial --seed 7": [0],
    'psql "$(toolkit sandbox url)"': [0, 0],
    "toolkit sandbox psql -c 'SELECT count(*) FROM ml_experiments'": [0],
    "toolkit sandbox pg_dump -Fc -f before-toolkit.dump": [0],
    "toolkit sandbox pg_restore --list before-toolkit.dump": [0],
    "toolkit demo": [0],
    "toolkit sandbox stop": [0],
}
# `toolkit fleet` examples run in this order, in a directory holding a fleet.yml of one
# database (cell-1, the realistic database, through FLEET_CELL_1_URL).
FLEET_EXAMPLES: dict[str, list[int]] = {
    "toolkit fleet plan --inventory fleet.yml": [0],
    "toolkit fleet plan --inventory fleet.yml --concurrency 8 --json": [0],
    "toolkit fleet pipeline milestone-1 --inventory fleet.yml --out fleet-pipeline.yml": [0],
    "toolkit fleet job --database cell-1 milestone-1 -- --reconnect 3": [0],
    "toolkit fleet report fleet-artifacts --inventory fleet.yml": [0],
    "toolkit fleet k8s-job milestone-1 --image registry.example.com/toolkit:0.1.0 --out fleet-jobs.yml": [0],
}
# Examples that serve until stopped: run as a process against the realistic database, asked
# one question through the address they print, then stopped with SIGTERM (exit 0).
SERVING_EXAMPLES = ("toolkit mlflow serve --port 0",)


def help_examples() -> dict[str, list[str]]:
    """Each example line of the help, and the commands whose help shows it."""
    found: dict[str, list[str]] = {}

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        ctx = click.Context(command, info_name=" ".join(path), terminal_width=10_000,
                            max_content_width=10_000)
        for match in re.finditer(r"Example: (.+)$", command.get_help(ctx), re.MULTILINE):
            found.setdefault(match[1].strip(), []).append(" ".join(path))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), (*path, name))

    walk(cli, ("toolkit",))
    return found


@dataclass
class Ran:
    words: list[str]
    exit_code: int
    output: str


def run_example(line: str, env: dict[str, str], cwd) -> list[Ran]:
    """Run ``line`` as a shell would, ``toolkit`` being this CLI (in-process), every other
    program a real process; stops at a failed ``&&``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    tokens = list(lexer)
    ran: list[Ran] = []
    commands: list[tuple[str, list[str]]] = [("", [])]
    for token in tokens:
        if token in (";", "&&"):
            commands.append((token, []))
        else:
            commands[-1][1].append(token)

    def one(words: list[str]) -> Ran:
        if words[0] == "toolkit":
            result = CliRunner().invoke(cli, words[1:], env=env, catch_exceptions=False)
            done = Ran(words, result.exit_code, result.output)
        else:
            program = shutil.which(words[0])
            if program is None:
                pytest.skip(f"{words[0]} is not installed (example: {line})")
            process = subprocess.run([program, *words[1:]], stdin=subprocess.DEVNULL, capture_output=True,
                                     text=True, timeout=60, cwd=cwd)
            done = Ran(words, process.returncode, process.stdout + process.stderr)
        ran.append(done)
        return done

    for joiner, words in commands:
        if joiner == "&&" and ran and ran[-1].exit_code != 0:
            break
        expanded = []
        for word in words:
            if substitution := re.fullmatch(r"\$\((.*)\)", word):
                expanded.append(one(shlex.split(substitution[1])).output.strip())
            else:
                expanded.append(word)
        one(expanded)
    return ran


def _check(line: str, ran: list[Ran], expected: list[int]) -> None:
    for r in ran:
        assert r.exit_code not in (ExitCode.USAGE, ExitCode.INTERNAL), (line, r.words, r.output)
    assert [r.exit_code for r in ran] == expected, (line, [(r.words, r.output) for r in ran])


def test_every_example_in_the_help_is_listed_here():
    found = set(help_examples())
    listed = set(DATABASE_EXAMPLES) | set(SANDBOX_EXAMPLES) | set(SERVING_EXAMPLES) | set(FLEET_EXAMPLES)
    assert found == listed, {"in the help, not here": found - listed, "here, not in the help": listed - found}


def test_the_database_examples_run(realistic_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fingerprint --out before.json writes here
    env = {"TOOLKIT_DATABASE_URL": realistic_db.url_text}
    for line, (setup, expected) in DATABASE_EXAMPLES.items():
        for milestone in setup:
            applied = CliRunner().invoke(cli, ["-q", "migrate", milestone, "--yes"], env=env,
                                         catch_exceptions=False)
            assert applied.exit_code == 0, (milestone, applied.output)
        _check(line, run_example(line, env, tmp_path), expected)
    assert realistic_db.scalar("SELECT to_regclass('toolkit.m4_archive_ml_experiments')") is None


def test_the_fleet_examples_run(realistic_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fleet.yml").write_text("databases:\n  - {name: cell-1, url_env: FLEET_CELL_1_URL}\n")
    for line, expected in FLEET_EXAMPLES.items():
        _check(line, run_example(line, {"FLEET_CELL_1_URL": realistic_db.url_text}, tmp_path), expected)
    assert realistic_db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-1'") == "verified"


def test_the_sandbox_examples_run(sandbox_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # sandbox pg_dump -f before-toolkit.dump writes here
    for line, expected in SANDBOX_EXAMPLES.items():
        _check(line, run_example(line, {}, tmp_path), expected)


def test_the_serving_examples_run(realistic_db):
    for line in SERVING_EXAMPLES:
        words = shlex.split(line)
        process = subprocess.Popen([sys.executable, "-m", "toolkit", *words[1:]], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "TOOLKIT_DATABASE_URL": realistic_db.url_text})
        try:
            said = ""
            for said_line in process.stdout:
                said += said_line
                if said_line.startswith("Ctrl-C"):
                    break
            uri = next(w for w in said.split() if w.startswith("MLFLOW_TRACKING_URI=")).split("=", 1)[1]
            with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/list", timeout=30) as answer:
                assert answer.status == 200 and json.loads(answer.read())["experiments"], line
        finally:
            process.terminate()
            assert process.wait(timeout=20) == 0, (line, process.stderr.read())
