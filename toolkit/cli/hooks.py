"""``--hooks-dir DIR``: executables the run calls at its milestones, as gh-ost's hooks.

gh-ost (``doc/hooks.md``) and Flyway's callbacks let the people who run a migration plug in
what their site needs, without a wrapper script around the tool: page the channel on
start, refuse to start outside the change window, snapshot before the cut-over, post the
outcome. :class:`Hooks` is a sink of :class:`toolkit.cli.observe.Observed`, told every
structured event of the run, and calls the executable of ``DIR`` named for it:

``on-start``        the gate and preconditions hold, the runner lock is held, nothing is
                    written yet (the ``go_ahead`` event); a non-zero exit vetoes the run
``on-phase``        a phase begins (``fingerprint``, ``apply``, ``verify``, ``checks``)
``on-status``       every ``--hooks-status-every`` minutes while the run goes (a thread: a
                    run paused or throttled for an hour still reports)
``on-throttled``    a wait on the database's health begins
``on-held``         ``--hold-before-drop`` began to hold milestone 4 before its drops
``on-before-drop``  milestone 4 is about to drop (after any hold); a non-zero exit vetoes
``on-control``      the run took a ``toolkit control`` request
``on-success``      the command ended with exit code 0 (after ``on-start`` ran)
``on-failure``      it ended with any other code (after ``on-start`` ran; a veto included)

A veto (non-zero exit, or killed at ``--hooks-timeout``) of ``on-start`` or
``on-before-drop`` raises :class:`toolkit.errors.HookVetoed` from inside the event, at a
boundary where nothing is half-done: exit 6, resumable, nothing written after it. Any
other hook's failure is a warning. The environment (``TOOLKIT_HOOK_*``, documented in
docs/operations.md) never carries the password: the variables that could hold it are
removed from what the hook inherits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from toolkit import __version__
from toolkit.cli.metrics import RESUMABLE
from toolkit.cli.params import BadValue
from toolkit.db import DATABASE_URL_ENV
from toolkit.errors import HookVetoed, redact

HOOKS = ("on-start", "on-phase", "on-status", "on-throttled", "on-held", "on-before-drop",
         "on-control", "on-success", "on-failure")
VETOING = ("on-start", "on-before-drop")
# What a hook must not inherit: the URL and libpq's password (the values of any other
# variable that holds a secret of the run are removed too: Hooks._environment).
NOT_INHERITED = (DATABASE_URL_ENV, "PGPASSWORD")
SAID_CHARS = 200  # of a failing hook's last line of output, in the message


class HooksDir(click.ParamType):
    """``--hooks-dir``: a directory whose ``on-*`` files are all hooks this run can call.

    Checked while the command line is read, so a typo (``on-sucess``), a hook left without
    its executable bit or a directory that is not there is a usage error before anything
    connects, not a hook silently never called in the middle of a production run."""

    name = "directory"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(str(value))
        if not str(value).strip() or "\x00" in str(value):
            self.fail("is empty: give the directory of the hooks", param, ctx)
        if not path.is_dir():
            raise BadValue(f"{path} is not a directory", "create it and put the hooks in it "
                           "(docs/operations.md, \"Hooks\")", param=param, ctx=ctx)
        for entry in sorted(path.iterdir()):
            if not entry.name.startswith("on-"):
                continue
            if entry.name not in HOOKS:
                raise BadValue(f"{entry} is named like a hook but no event has that name",
                               f"name it one of {', '.join(HOOKS)}", param=param, ctx=ctx)
            if not entry.is_file() or not os.access(entry, os.X_OK):
                raise BadValue(f"{entry} is not an executable file", f"chmod +x {entry}",
                               param=param, ctx=ctx)
        return path.resolve()  # a hook runs in DIR: a relative DIR would be looked for in itself


HOOKS_DIR = HooksDir()


class Hooks:
    """A sink of :class:`toolkit.cli.observe.Observed`: keeps what a hook is told, calls it."""

    def __init__(self, directory: Path, *, database: str | None, run: str, timeout_s: float,
                 status_every_s: float, secrets: Callable[[], tuple[str, ...]],
                 warn: Callable[[str], None]) -> None:
        self.directory, self.database, self.run = directory, database or "", run
        self.timeout_s, self.status_every_s = timeout_s, status_every_s
        self._secrets, self._warn = secrets, warn
        self.present = {name for name in HOOKS if (directory / name).is_file()}
        self._lock = threading.Lock()  # the state, read by the status thread
        self._late: list[str] = []  # warnings of the status thread, said on the main thread
        self.started_at: float | None = None
        self.command = self.milestone = self.phase = self.pass_name = ""
        self.run_id: int | None = None
        self.rows_done = self.keys_done = 0
        self.keys_total: int | None = None
        self.pass_started: float | None = None
        self.throttled: dict[int | None, dict[str, float]] = {}  # by history run, by signal
        self.throttled_since: float | None = None
        self._stop = threading.Event()
        self._status: threading.Thread | None = None

    # -- the events ------------------------------------------------------------------
    def record(self, name: str, fields: dict[str, Any]) -> None:
        with self._lock:
            late, self._late = self._late, []
            self._keep(name, fields)
        for message in late:
            self._warn(message)
        if name == "go_ahead":
            self.started_at = time.monotonic()
            self.call("on-start")
            self._start_status()
        elif name == "phase":
            self.call("on-phase")
        elif name == "throttle" and fields.get("state") == "waiting":
            self.call("on-throttled", TOOLKIT_HOOK_SIGNALS=",".join(
                s["signal"] for s in fields.get("signals") or []))
        elif name == "held":
            self.call("on-held")
        elif name == "before_drop":
            self.call("on-before-drop", TOOLKIT_HOOK_PASS=fields.get("pass_name") or "")
        elif name == "control":
            self.call("on-control", **_control_env(fields))
        elif name == "end" and self.started_at is not None:
            self._stop.set()
            code = int(fields["exit_code"])
            error = fields.get("error") or {}
            self.call("on-success" if code == 0 else "on-failure",
                      TOOLKIT_HOOK_EXIT_CODE=str(code), TOOLKIT_HOOK_OUTCOME=fields.get("outcome") or "",
                      TOOLKIT_HOOK_ERROR=error.get("problem") or "",
                      TOOLKIT_HOOK_RESUMABLE="1" if code in RESUMABLE else "0")

    def _keep(self, name: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if name == "start":
            self.command = fields.get("command") or ""
        elif name == "go_ahead":
            self.milestone = fields["milestone"]
        elif name == "run_start":
            self.run_id, self.milestone = fields["run_id"], fields["milestone"]
        elif name == "phase":
            self.phase = fields["phase"]
        elif name == "pass_start":
            self.pass_name, self.keys_total, self.keys_done = fields["pass_name"], fields["keys"], 0
            self.pass_started = now
        elif name == "batch":
            self.rows_done += fields["rows"]
            self.keys_done += fields["keys"]
        elif name == "pass_end":
            self.pass_name = fields["pass_name"]
        elif name == "throttle":
            self.throttled_since = now if fields["state"] == "waiting" else None
            if "throttled_seconds" in fields:
                self.throttled[self.run_id] = fields["throttled_seconds"]
        elif name == "run_end":
            self.throttled[fields["run_id"]] = fields.get("throttled_seconds") or {}
            self.throttled_since = None

    # -- calling a hook --------------------------------------------------------------
    def call(self, hook: str, **extra: str) -> None:
        """Run ``hook`` if the directory has it, at most ``timeout_s``: a veto raises, any
        other failure is a warning."""
        if hook not in self.present:
            return
        failure = self._run(hook, extra)
        if failure is None:
            return
        if hook in VETOING:
            raise HookVetoed(hook, failure, self.milestone)
        self._warn(f"hook {hook} failed ({failure}); the run goes on")

    def _run(self, hook: str, extra: dict[str, str]) -> str | None:
        """The hook's run: None when it exited 0, else what went wrong, in a few words."""
        with self._lock:
            env = self._environment(hook, extra)
        try:
            process = subprocess.Popen([str(self.directory / hook)], cwd=self.directory, env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            return f"could not be started: {exc.strerror or type(exc).__name__}"
        try:
            stdout, stderr = process.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill(process)
            return f"did not end within --hooks-timeout {self.timeout_s:g} s and was killed"
        except BaseException:  # Ctrl-C meanwhile: the hook, in a session of its own, goes too
            _kill(process)
            raise
        if process.returncode == 0:
            return None
        said = _last_line(stderr) or _last_line(stdout)
        said = f": {redact(said, self._secrets())[:SAID_CHARS]}" if said else ""
        if process.returncode < 0:
            return f"killed by signal {-process.returncode}{said}"
        return f"exit code {process.returncode}{said}"

    def _environment(self, hook: str, extra: dict[str, str]) -> dict[str, str]:
        """The toolkit's environment less anything holding the password, and the run's
        numbers (docs/operations.md, "Hooks")."""
        secrets = [s for s in self._secrets() if s]
        env = {k: v for k, v in os.environ.items()
               if k not in NOT_INHERITED and not k.startswith("TOOLKIT_HOOK_")
               and not any(s in v for s in secrets)}
        now = time.monotonic()
        waited = sum(s for by_signal in self.throttled.values() for s in by_signal.values())
        if self.throttled_since is not None:
            waited += now - self.throttled_since
        rate = eta = progress = ""
        if self.keys_total is not None:
            progress = f"{100 * self.keys_done / self.keys_total:.1f}" if self.keys_total else "100.0"
            took = now - self.pass_started if self.pass_started is not None else 0
            if self.keys_done and took > 0:
                per_s = self.keys_done / took
                rate = f"{per_s:.1f}"
                eta = f"{max(self.keys_total - self.keys_done, 0) / per_s:.0f}"
        env.update({
            "TOOLKIT_HOOK_EVENT": hook,
            "TOOLKIT_HOOK_COMMAND": self.command,
            "TOOLKIT_HOOK_DATABASE": self.database,
            "TOOLKIT_HOOK_RUN": self.run,
            "TOOLKIT_HOOK_RUN_ID": "" if self.run_id is None else str(self.run_id),
            "TOOLKIT_HOOK_MILESTONE": self.milestone,
            "TOOLKIT_HOOK_PHASE": self.phase,
            "TOOLKIT_HOOK_PASS": self.pass_name,
            "TOOLKIT_HOOK_ROWS_DONE": str(self.rows_done),
            "TOOLKIT_HOOK_KEYS_DONE": str(self.keys_done),
            "TOOLKIT_HOOK_KEYS_TOTAL": "" if self.keys_total is None else str(self.keys_total),
            "TOOLKIT_HOOK_PROGRESS": progress,
            "TOOLKIT_HOOK_RATE": rate,
            "TOOLKIT_HOOK_ETA_SECONDS": eta,
            "TOOLKIT_HOOK_THROTTLED": "1" if self.throttled_since is not None else "0",
            "TOOLKIT_HOOK_THROTTLED_SECONDS": f"{waited:.1f}",
            "TOOLKIT_HOOK_ELAPSED_SECONDS": "" if self.started_at is None
            else f"{now - self.started_at:.1f}",
            "TOOLKIT_HOOK_TOOLKIT_VERSION": __version__,
        })
        env.update({k: redact(v, tuple(secrets)) for k, v in extra.items()})
        return env

    # -- on-status -------------------------------------------------------------------
    def _start_status(self) -> None:
        if "on-status" not in self.present or self._status is not None:
            return
        self._status = threading.Thread(target=self._every, name="toolkit on-status", daemon=True)
        self._status.start()

    def _every(self) -> None:
        while not self._stop.wait(self.status_every_s):
            failure = self._run("on-status", {})
            if failure is not None:
                with self._lock:
                    self._late.append(f"hook on-status failed ({failure}); the run goes on")

    def close(self) -> None:
        self._stop.set()
        if self._status is not None:
            self._status.join(self.timeout_s + 5)


def _control_env(fields: dict[str, Any]) -> dict[str, str]:
    by = f"{fields.get('db_user') or ''} ({fields.get('os_user') or ''}@{fields.get('host') or ''})"
    return {"TOOLKIT_HOOK_CONTROL_ACTION": str(fields.get("action") or ""),
            "TOOLKIT_HOOK_CONTROL_KEY": str(fields.get("key") or ""),
            "TOOLKIT_HOOK_CONTROL_VALUE": str(fields.get("value") or ""),
            "TOOLKIT_HOOK_CONTROL_REASON": str(fields.get("reason") or ""),
            "TOOLKIT_HOOK_CONTROL_BY": by}


def _last_line(data: bytes | None) -> str:
    lines = (data or b"").decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def _kill(process: subprocess.Popen) -> None:
    """The hook and whatever it started (its own session: a process group of its own)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    try:
        process.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a child that left the group keeps the pipes open
        process.wait()
