"""``fleet job``: one database's milestone, as a CI job or a Kubernetes pod runs it.

The milestone itself runs as ``toolkit --json migrate|rollback``, exactly the command an
operator would type for that database (its exit code is the job's, so CI's
``retry: exit_codes`` and Kubernetes' ``podFailurePolicy`` see the toolkit's own codes);
around it the job reads the milestone's state before and after, and leaves ``job.json``,
the run's ``report.json`` (its --json document), log and ``events.jsonl`` (its --events
stream), and a JUnit file in
``OUT/<database>/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import DBAPIError

from toolkit import milestones
from toolkit.db import create_engine
from toolkit.engine.inspection import Inspector
from toolkit.errors import ExitCode, ToolkitError
from toolkit.fleet import connect, record
from toolkit.fleet.inventory import Database
from toolkit.output import out


def milestone_state(database: Database, milestone: str) -> str | None:
    """The milestone's recorded state, or None when it cannot be read (the run's error
    says why)."""
    try:
        engine = create_engine(connect.target(database))
    except ToolkitError:
        return None
    try:
        return Inspector(engine, milestones.plan()).states().get(milestone)
    except (ToolkitError, DBAPIError):  # not GitLab's, unreachable: the run's error says why
        return None
    finally:
        engine.dispose()


def command(database: Database, action: str, milestone: str, extra: tuple[str, ...],
            events: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The toolkit's arguments and environment for ``action milestone`` on ``database``;
    with ``events``, the run's JSON-lines stream goes there (docs/operations.md)."""
    env, global_args = connect.run_environment(database)
    words = [*global_args, "--json", action, milestone]
    if events is not None:
        words += ["--events", str(events)]
    if action == "migrate" and milestones.get(milestone).confirm:
        words.append("--yes")  # the pipeline was generated, reviewed and started by a person
    return [*words, *extra], env


def run(database: Database, action: str, milestone: str, out_dir: Path,
        extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the milestone on ``database``; the record it leaves (``exit_code`` is the job's)."""
    where = out_dir / database.name
    where.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC)
    started = time.monotonic()
    before = milestone_state(database, milestone)
    try:
        words, env = command(database, action, milestone, extra, where / record.EVENTS_FILE)
    except ToolkitError as exc:
        code, document, log = int(exc.exit_code), None, exc.one_line()
    else:
        code, document, log = _toolkit(words, env, where)
    seconds = time.monotonic() - started
    after = milestone_state(database, milestone)
    done = {
        "database": database.name, "wave": database.wave, "tags": list(database.tags),
        "action": action, "milestone": milestone, "exit_code": code,
        "status": "succeeded" if code == 0 else "failed", "resumable": code in record.RESUMABLE,
        "started_at": started_at.isoformat(), "seconds": round(seconds, 3),
        "state_before": before, "state_after": after,
        **record.summary(document),
    }
    if code and not done["error"]:
        done["error"] = (log.strip().splitlines() or [record.meaning(code)])[-1]
    (where / record.JOB_FILE).write_text(json.dumps(done, indent=2) + "\n")
    (where / record.JUNIT_FILE).write_bytes(record.junit({database.wave: [done]}))
    return done


def _toolkit(words: list[str], env: dict[str, str], where: Path) -> tuple[int, dict | None, str]:
    """``toolkit WORDS`` in this process, its stdout (the --json document) and stderr in
    ``where``: no second interpreter to start per database (seconds on a busy runner).
    The environment is the database's for the run's duration, so the toolkit resolves it
    as it would in a process of its own; a SIGTERM or Ctrl-C stops the run at its batch
    boundary (exit 130), as it does any toolkit command."""
    from toolkit.cli.main import cli

    saved_env = dict(os.environ)
    saved_output = (out.json_mode, out.quiet, out.secrets, out.warnings)
    report_path, log_path = where / record.REPORT_FILE, where / record.LOG_FILE
    try:
        os.environ.clear()
        os.environ.update(env)
        with open(report_path, "w") as report, open(log_path, "w") as log, \
                contextlib.redirect_stdout(report), contextlib.redirect_stderr(log):
            code = cli.main(words, prog_name="toolkit", standalone_mode=False)
    except click.exceptions.Abort:
        code = int(ExitCode.INTERRUPTED)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        out.json_mode, out.quiet, out.secrets, out.warnings = saved_output
        out.stdout = out.stderr = None
    code = code if isinstance(code, int) else 0
    text = report_path.read_text()
    try:
        document = json.loads(text) if text.strip() else None
    except ValueError:
        document = None
    return code, document, log_path.read_text()
