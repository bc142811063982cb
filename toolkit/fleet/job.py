"""``fleet job``: one database's milestone, as a CI job or a Kubernetes pod runs it.

The milestone itself runs in a child ``toolkit --json migrate|rollback`` process, exactly
the command an operator would type for that database (its exit code is the job's, so CI's
``retry: exit_codes`` and Kubernetes' ``podFailurePolicy`` see the toolkit's own codes);
around it the job reads the milestone's state before and after, and leaves ``job.json``,
the child's ``report.json`` and log, and a JUnit file in ``OUT/<database>/``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from toolkit import milestones
from toolkit.db import create_engine
from toolkit.engine.runner import Runner
from toolkit.errors import ToolkitError
from toolkit.fleet import connect, record
from toolkit.fleet.inventory import Database


def milestone_state(database: Database, milestone: str) -> str | None:
    """The milestone's recorded state, or None when it cannot be read (the child's error
    says why)."""
    try:
        engine = create_engine(connect.target(database))
    except ToolkitError:
        return None
    try:
        return Runner(engine, plan=milestones.plan()).states().get(milestone)
    except Exception:  # unreachable, not GitLab's: the run's own error is the one reported
        return None
    finally:
        engine.dispose()


def command(database: Database, action: str, milestone: str,
            extra: tuple[str, ...]) -> tuple[list[str], dict]:
    env, global_args = connect.child_environment(database)
    words = [sys.executable, "-m", "toolkit", *global_args, "--json", action, milestone]
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
        words, env = command(database, action, milestone, extra)
    except ToolkitError as exc:
        code, document, log = int(exc.exit_code), None, exc.one_line()
    else:
        code, document, log = _child(words, env, where)
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


def _child(words: list[str], env: dict, where: Path) -> tuple[int, dict | None, str]:
    """Run the toolkit; a SIGTERM to the job (Kubernetes stopping the pod, GitLab
    cancelling) is passed on, so the run stops at its batch boundary and says so."""
    with open(where / record.REPORT_FILE, "w") as report, open(where / record.LOG_FILE, "w") as log:
        child = subprocess.Popen(words, env=env, stdout=report, stderr=log)
        previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            while True:
                try:
                    code = child.wait()
                    break
                except KeyboardInterrupt:  # Ctrl-C reached the child too (one process group)
                    continue
        finally:
            signal.signal(signal.SIGTERM, previous)
    text = (where / record.REPORT_FILE).read_text()
    try:
        document = json.loads(text) if text.strip() else None
    except ValueError:
        document = None
    if code < 0:  # killed by a signal: the shell's convention, 128 + signal
        code = 128 - code
    return code, document, (where / record.LOG_FILE).read_text()
