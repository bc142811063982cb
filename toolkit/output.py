"""All terminal output goes through here: narration, tables, warnings, JSON, progress.

One module means one place that knows whether we are talking to a person (plain lines,
progress bars on a terminal) or to CI (``--json``: exactly one JSON document on stdout,
nothing else there). Every string passes through :func:`toolkit.errors.redact` so a
password can never reach the screen or a log.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dt_time
from typing import Any, TextIO

from toolkit.engine.events import progress_every_s
from toolkit.errors import redact
from toolkit.progress import PassBar, ProgressLines


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    secrets: tuple[str, ...] = ()
    stdout: TextIO | None = None
    stderr: TextIO | None = None
    warnings: list[str] = field(default_factory=list)

    # Streams are looked up at call time so Click's CliRunner, which swaps sys.stdout,
    # captures everything.
    def _out(self) -> TextIO:
        return self.stdout or sys.stdout

    def _err(self) -> TextIO:
        return self.stderr or sys.stderr

    def _clean(self, text: str) -> str:
        return redact(text, self.secrets)

    @staticmethod
    def _print(text: str, stream: TextIO) -> None:
        """One line, flushed, in one write (threads of a server never interleave inside a
        line). When the reader has gone (``toolkit history | head -1``), the rest of the
        output is not wanted: it goes to /dev/null and the command carries on to its own end
        and exit code, without a word about the pipe."""
        try:
            stream.write(f"{text}\n")
            stream.flush()
        except BrokenPipeError:
            discard(stream)

    def say(self, message: str = "") -> None:
        """Narration for a person; silent with --json or --quiet."""
        if not self.json_mode and not self.quiet:
            self._print(self._clean(message), self._out())

    def warn(self, message: str) -> None:
        """A warning is kept for the JSON document and shown to a person on stderr."""
        message = self._clean(message)
        self.warnings.append(message)
        if not self.json_mode:
            self._print(f"warning: {message}", self._err())

    def note(self, message: str) -> None:
        """A progress line on stderr (with --json too, where stdout keeps its one document);
        silent with --quiet."""
        if not self.quiet:
            self._print(self._clean(message), self._err())

    def error(self, message: str) -> None:
        self._print(f"error: {self._clean(message)}", self._err())

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """A plain aligned table; numbers right-aligned so counts can be compared by eye."""
        if self.json_mode or self.quiet:
            return
        rows = [["" if v is None else str(v) for v in row] for row in rows]
        widths = [len(h) for h in headers]
        for row in rows:
            widths = [max(w, len(v)) for w, v in zip(widths, row, strict=True)]
        numeric = [all(_is_number(r[i]) for r in rows) and rows != [] for i in range(len(headers))]

        def fmt(values: Sequence[str]) -> str:
            cells = [
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(values, widths, numeric, strict=True)
            ]
            return "  ".join(cells).rstrip()

        self.say(fmt(list(headers)))
        self.say(fmt(["-" * w for w in widths]))
        for row in rows:
            self.say(fmt(row))

    def document(self, doc: dict[str, Any]) -> None:
        """The one JSON document of a command (only with --json)."""
        if self.json_mode:
            if self.warnings and "warnings" not in doc:
                doc = {**doc, "warnings": self.warnings}
            text = json.dumps(doc, indent=2, sort_keys=True, default=json_value)
            self._print(self._clean(text), self._out())

    def json_line(self, text: str) -> None:
        """A JSON document on one line (only with --json), for output that is a stream of
        documents (``status --watch --json``), read line by line."""
        if self.json_mode:
            self._print(self._clean(text), self._out())

    def progress(self, total: int | None, name: str) -> PassBar | ProgressLines:
        """A pass's progress (toolkit/progress.py): a bar with rate and time left on a
        terminal. Off a terminal (a CI log, a file) a bar would be noise, and silence for a
        30-minute pass looks like a hang: a plain line every few seconds instead, on stderr,
        with --json too (stdout keeps its one document). Nothing with --quiet."""
        stream = self._err()
        if not self.quiet and not getattr(stream, "isatty", lambda: False)():
            return ProgressLines(lambda line: self._print(self._clean(line), self._err()), name, total,
                                 progress_every_s())
        return PassBar(stream, name, total, disable=self.json_mode or self.quiet)


def json_value(value: object) -> object:
    """What JSON cannot hold, as text: a moment in ISO 8601 (``2026-12-02T06:57:06+00:00``,
    in UTC when it has a zone), which every JSON reader parses (``str()`` of a datetime puts
    a space where ISO 8601 has ``T``); anything else (Decimal, UUID, Path) as ``str()``."""
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo is not None else value).isoformat()
    if isinstance(value, date | dt_time):
        return value.isoformat()
    return str(value)


def discard(stream: TextIO) -> None:
    """Send what is left of ``stream``'s output to /dev/null after a BrokenPipeError, as
    Python's documentation advises (signal module, "Note on SIGPIPE"): later writes, and
    the flush at exit, then neither fail nor print "Exception ignored"."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file (a test's capture): nothing of it can fail later
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


out = Output()


def configure(*, json_mode: bool = False, quiet: bool = False, secrets: tuple[str, ...] = ()) -> Output:
    """Reset the shared output for one command invocation."""
    out.json_mode = json_mode
    out.quiet = quiet
    out.secrets = secrets
    out.warnings = []
    out.stdout = None
    out.stderr = None
    return out
