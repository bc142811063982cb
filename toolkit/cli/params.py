"""The option types every command shares, so every value is checked by Click before
anything connects.

A number that reaches the database unchecked fails there, after a run row was written
(``--statement-timeout-ms 99999999999``: PostgreSQL's integer settings stop at 2147483647),
or never fails at all (``--lock-wait nan`` compares false with everything, so it never
ends; ``--read-timeout 0.0001`` rounds to 0 ms, which PostgreSQL reads as *no* timeout).
Each type here says its bounds and why, and refuses anything else with one line naming
the option: a usage error, exit 2, with nothing connected and nothing written.

Files are checked the same way: an output file must be writable before the work that
fills it starts (a fingerprint of a large database takes minutes), and a fingerprint to
compare with must be one (verify/fingerprint_format.py), field by field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import click

from toolkit.engine import settings
from toolkit.engine.settings import BIGINT_MAX, PG_INT_MAX, Bound
from toolkit.verify.fingerprint import Fingerprint
from toolkit.verify.fingerprint_format import FormatProblem, check

BIGINT_MIN = -(2**63)
SHOWN_DIGITS = 24  # a value longer than this is cut in the message


class BadValue(click.BadParameter):
    """Click's usage error with the operator's next step, said after the problem."""

    def __init__(self, message: str, next_step: str | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.next_step = next_step


def _shown(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= SHOWN_DIGITS else text[:SHOWN_DIGITS] + "...")


def _seconds(bound: float) -> str:
    return f"{int(bound):,} s" if bound == int(bound) else f"{bound:,.3f} s"


class Whole(click.types.IntParamType):
    """An integer from ``low`` to ``high``; ``why`` says where the upper bound comes from."""

    name = "integer"

    def __init__(self, low: int, high: int, why: str, unit: str = ""):
        self.low, self.high, self.why, self.unit = low, high, why, unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            digits = text.removeprefix("-").removeprefix("+")
            if not digits.isascii() or not digits.isdigit():
                self.fail(f"{_shown(value)} is not a whole number", param, ctx)
            if len(digits) > 20:  # Python refuses to read past 4300 digits; no bound needs 21
                number = self.high + 1 if not text.startswith("-") else self.low - 1
            else:
                number = int(text)
        if number < self.low:
            self.fail(f"{_shown(value)} is less than {self.low}{self.unit}", param, ctx)
        if number > self.high:
            self.fail(f"{_shown(value)} is more than {self.high:,}{self.unit} ({self.why})", param, ctx)
        return number

    def __repr__(self) -> str:
        return f"Whole({self.low}, {self.high})"


class Seconds(click.types.FloatParamType):
    """A finite number of seconds from ``low`` to ``high`` (no nan, no inf, no 1e308).

    ``whole_ms``: the value becomes a PostgreSQL timeout in milliseconds, where 0 means
    none; a positive value under a millisecond would silently become that 0, so it is
    refused."""

    name = "seconds"
    noun = "number of seconds"

    def shown_bound(self, bound: float) -> str:
        return _seconds(bound)

    def __init__(self, high: float, why: str, *, low: float = 0.0, whole_ms: bool = False):
        self.low, self.high, self.why, self.whole_ms = low, high, why, whole_ms

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a {self.noun}", param, ctx)
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{_shown(value)} is not a {self.noun}", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{_shown(value)} is not a finite {self.noun}", param, ctx)
        if number < self.low:
            self.fail(f"{_shown(value)} is less than {self.shown_bound(self.low)}", param, ctx)
        if number > self.high:
            self.fail(f"{_shown(value)} is more than {self.shown_bound(self.high)} ({self.why})",
                      param, ctx)
        if self.whole_ms and 0 < number < 0.001:
            self.fail(f"{_shown(value)} is less than a millisecond, which PostgreSQL would take as "
                      "no timeout at all (0 for none)", param, ctx)
        return number

    def __repr__(self) -> str:
        return f"Seconds({self.low}, {self.high})"


class Rate(Seconds):
    """A finite rate in MB/s from ``low`` to ``high``, checked as seconds are. ``low`` is
    above 0: a limit of 0 would wait for ever on the WAL any session writes."""

    name = "MB/s"
    noun = "number of MB/s"

    def shown_bound(self, bound: float) -> str:
        return f"{bound:,.3f}".rstrip("0").rstrip(".") + " MB/s"

    def __repr__(self) -> str:
        return f"Rate({self.low}, {self.high})"


class Text(click.ParamType):
    """A string that is not empty (an empty ``--throttle-query`` would be silently off)."""

    name = "text"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not str(value).strip():
            self.fail(f"is empty: give {self.what}", param, ctx)
        if "\x00" in str(value):
            self.fail("holds a NUL character, which PostgreSQL cannot take", param, ctx)
        return str(value)


class FlagFile(click.ParamType):
    """A file whose existence pauses a run: not a directory (which exists already, so the
    run would wait for ever), in a directory that exists (else it can never be created)."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text.strip() or "\x00" in text:
            self.fail("is empty: give the path of a file to create when the run is to wait", param, ctx)
        path = Path(text)
        if path.is_dir():
            self.fail(f"{text} is a directory: it always exists, so the run would never go on", param, ctx)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            self.fail(f"{text} cannot ever exist: {parent} is not a directory", param, ctx)
        return text


class OutputFile(click.ParamType):
    """A file the command will write, proven writable now: opened for appending (which
    changes nothing in a file that exists) and removed again if it did not exist. Asking
    ``os.access`` would say yes to root everywhere, and nothing about a full or read-only
    file system."""

    name = "file"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            path = value
        else:
            if not str(value).strip() or "\x00" in str(value):
                self.fail("is empty: give the file to write", param, ctx)
            path = Path(str(value))
        if path.is_dir():
            self.fail(f"{path} is a directory, not a file", param, ctx)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.exists():
            raise BadValue(f"cannot write {path}: the directory {parent} does not exist",
                           f"create {parent} first, or write elsewhere", param=param, ctx=ctx)
        if not parent.is_dir():
            self.fail(f"cannot write {path}: {parent} is not a directory", param, ctx)
        existed = path.exists()
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            raise BadValue(f"cannot write {path}: {exc.strerror or type(exc).__name__}",
                           "choose a file this user can write", param=param, ctx=ctx) from None
        if not existed:
            path.unlink(missing_ok=True)
        return path


class FingerprintAt(NamedTuple):
    path: Path
    fingerprint: Fingerprint


class FingerprintFile(click.ParamType):
    """A fingerprint written by ``toolkit fingerprint --out``, read and checked whole:
    JSON, the format, every field of the shape the comparison reads. Returns the
    :class:`~toolkit.verify.fingerprint.Fingerprint` with its path."""

    name = "file"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> FingerprintAt:
        if isinstance(value, FingerprintAt):
            return value
        path = Path(str(value))
        step = "pass a file written by `toolkit fingerprint --out`"
        if not str(value).strip() or "\x00" in str(value):
            self.fail("is empty: give a file written by `toolkit fingerprint --out`", param, ctx)
        if path.is_dir():
            self.fail(f"{path} is a directory, not a fingerprint file", param, ctx)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BadValue(f"{path} does not exist", step, param=param, ctx=ctx) from None
        except UnicodeDecodeError:
            raise BadValue(f"{path} is not a toolkit fingerprint (not UTF-8 text)", step,
                           param=param, ctx=ctx) from None
        except OSError as exc:
            raise BadValue(f"{path} cannot be read: {exc.strerror or type(exc).__name__}",
                           "give a file this user can read", param=param, ctx=ctx) from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BadValue(f"{path} is not a toolkit fingerprint (not JSON: {exc})", step,
                           param=param, ctx=ctx) from None
        try:
            check(data)
            return FingerprintAt(path, Fingerprint.loads(text))
        except (FormatProblem, ValueError, TypeError) as exc:
            raise BadValue(f"{path} is not a toolkit fingerprint: {exc}", step,
                           param=param, ctx=ctx) from None


_OF_BOUND: dict[Bound, click.ParamType] = {}


def of(bound: Bound) -> click.ParamType:
    """The parameter type that takes exactly what a run setting's bound allows (one instance
    per bound): the option and ``toolkit control set`` convert with it, so both refuse alike."""
    if bound not in _OF_BOUND:
        kind = bound.kind
        _OF_BOUND[bound] = (
            Whole(int(bound.low), int(bound.high), bound.why, bound.unit) if kind == "whole" else
            Seconds(bound.high, bound.why, low=bound.low, whole_ms=bound.whole_ms) if kind == "seconds"
            else Rate(bound.high, bound.why, low=bound.low) if kind == "rate" else
            Text(bound.why) if kind == "text" else FlagFile() if kind == "path" else click.BOOL)
    return _OF_BOUND[bound]


def shown_bounds(bound: Bound) -> str | None:
    """A number's bounds as ``--help`` shows them (None for text, paths and flags)."""
    kind = of(bound)
    if isinstance(kind, Seconds):
        return f"{bound.low:g} to {kind.shown_bound(bound.high)}"
    if isinstance(kind, Whole):
        return f"{int(bound.low):,} to {int(bound.high):,}{bound.unit}"
    return None


# The shared instances: one per kind of number, used by every command that has one.
TIMEOUT_MS = of(settings.TIMEOUT_MS)
DURATION_MS = of(settings.DURATION_MS)
BATCH_SIZE = of(settings.BATCH_SIZE)
TRIES = of(settings.TRIES)
BATCHES = of(settings.BATCHES)
BYTES = of(settings.BYTES)
SEGMENTS = of(settings.SEGMENTS)
SECONDS = of(settings.SECONDS)
WAL_RATE = of(settings.WAL_RATE)
SQL_QUERY = of(settings.SQL_QUERY)
FLAG_FILE = of(settings.FLAG_FILE)
ROWS = Whole(1, PG_INT_MAX, "more rows than a table of runs holds")
ID = Whole(1, BIGINT_MAX, "GitLab's ids are bigint")
SEED = Whole(BIGINT_MIN, BIGINT_MAX, "the generator's seed is a bigint")
PER_CANDIDATE = Whole(1, 10_000, "ten thousand metric rows per candidate is already billions at x25")
READ_TIMEOUT_S = Seconds(PG_INT_MAX / 1000, "PostgreSQL's largest statement_timeout", whole_ms=True)
OUTPUT_FILE = OutputFile()


class EventsFile(OutputFile):
    """``--events``: a file proven writable now (as :class:`OutputFile`), or ``-`` for stderr."""

    def convert(  # type: ignore[override]  # a path, or "-" for stderr
            self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if str(value) == "-":
            return "-"
        return str(super().convert(value, param, ctx))


EVENTS_FILE = EventsFile()


class MetricsFile(OutputFile):
    """``--metrics-textfile``: a file proven writable now, as a path (it is replaced whole)."""

    def convert(  # type: ignore[override]  # the path as text, for the run's settings
            self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return str(super().convert(value, param, ctx))


METRICS_FILE = MetricsFile()
FINGERPRINT_FILE = FingerprintFile()

