"""``--events`` (and ``--metrics-textfile``): a run told to whoever watches, not only to a terminal.

The engine reports through the callbacks of :class:`toolkit.engine.events.Events`: text for
a person (``say``, ``warn``, ``note``, ``progress``) and, through the optional ``record``,
structured events (``emit`` in the engine: a batch, a throttle wait, a retry ...).
:class:`Observed` is the run's ``Events``: it hands the text to the terminal as before and
each structured event to the sinks the command line asked for. So the progress bar, the
``--json`` document and the event stream are told the same things, and the engine still
prints nothing. Names and fields are documented in ``docs/operations.md``; keep them stable.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import uuid
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from toolkit import __version__
from toolkit.errors import redact
from toolkit.output import Output

STDERR = "-"


def utc_now() -> str:
    """ISO 8601 in UTC with ``T`` and ``Z``, to the millisecond: what log shippers parse."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Sink(Protocol):
    def record(self, name: str, fields: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class EventStream:
    """One JSON object per line, each written whole and flushed at once: a run killed at any
    moment leaves a file whose every line parses (at worst, the last one is missing).
    Appended to, so the runs that resume one another can share a file; ``run`` tells
    them apart."""

    def __init__(self, path: str, run: str, secrets: Any) -> None:
        self.path, self.run, self._secrets, self.seq = path, run, secrets, 0
        self._file: TextIO | None = None if path == STDERR else open(path, "a", encoding="utf-8")  # noqa: SIM115

    def _stream(self) -> TextIO:
        return self._file or sys.stderr  # looked up at call time, as toolkit.output does

    def record(self, name: str, fields: dict[str, Any]) -> None:
        self.seq += 1
        line = json.dumps({"event": name, "time": utc_now(), "run": self.run, "seq": self.seq,
                           **fields}, default=str, separators=(",", ":"))
        stream = self._stream()
        stream.write(redact(line, self._secrets()) + "\n")
        stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Observed:
    """The run's :class:`~toolkit.engine.events.Events`: the terminal, plus the sinks."""

    def __init__(self, out: Output, sinks: list[Sink]) -> None:
        self.out, self.sinks = out, sinks
        self._ended = False

    @property
    def secrets(self) -> tuple[str, ...]:
        return self.out.secrets

    def say(self, message: str = "") -> None:
        self.out.say(message)

    def warn(self, message: str) -> None:
        self.out.warn(message)
        self.record("warning", {"message": message})

    def note(self, message: str) -> None:
        self.out.note(message)

    def progress(self, total: int | None, name: str) -> Any:
        return self.out.progress(total, name)

    def record(self, name: str, fields: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.record(name, fields)

    def start(self, command: str, database: str | None) -> None:
        self.record("start", {"command": command, "toolkit_version": __version__,
                              "database": database, "pid": os.getpid(),
                              "os_user": _os_user(), "host": socket.gethostname()})

    def end(self, exit_code: int, error: dict[str, Any] | None = None) -> None:
        """The last line: how the command ended and its exit code (docs/output.md),
        written before the process exits; once."""
        if self._ended:
            return
        self._ended = True
        self.record("end", {"exit_code": exit_code, "ok": exit_code == 0,
                            "outcome": "succeeded" if exit_code == 0 else (error or {}).get("kind"),
                            "error": error})

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def new_run_id() -> str:
    """One id per command: every line of its stream carries it (a command can open several
    history runs: one per ``--reconnect`` attempt; their ids are in ``run_start``)."""
    return uuid.uuid4().hex


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
