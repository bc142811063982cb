"""How the engine tells what it is doing: through callbacks it is given, never by printing.

Django's executor reports progress through a callback and Alembic's runtime logs while only
its command layer prints; the engine here does both. A command passes its terminal
(:class:`toolkit.output.Output` has these methods) as the run's :class:`Events`; a library
caller (``scripts/bench.py``, a test) gets :class:`Logged`, which hands each message to
the ``toolkit.engine`` logger.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

PROGRESS_EVERY_ENV = "TOOLKIT_PROGRESS_EVERY_S"
log = logging.getLogger("toolkit.engine")


def progress_every_s() -> float:
    """How often a long wait or pass reports itself (seconds, ``TOOLKIT_PROGRESS_EVERY_S``)."""
    try:
        return float(os.environ.get(PROGRESS_EVERY_ENV, "5"))
    except ValueError:
        return 5.0


class Progress(Protocol):
    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> object: ...

    def update(self, n: int, changed: int = 0) -> object:
        """``n`` more keys of the driving table scanned, ``changed`` more rows changed."""


class Events(Protocol):
    """What a run reports: narration, warnings, notes, and the progress of a pass."""

    @property
    def secrets(self) -> tuple[str, ...]:
        """Never to be shown: the events' reader redacts them."""

    def say(self, message: str = "") -> None: ...

    def warn(self, message: str) -> None: ...

    def note(self, message: str) -> None: ...

    def progress(self, total: int | None, name: str) -> Progress:
        """The progress of the pass ``name`` over ``total`` keys of its driving table."""


def emit(events: Events, name: str, /, **fields: Any) -> None:
    """Tell a subscriber that takes structured events what just happened (a batch, a
    throttle wait, a retry ...): ``events.record(name, fields)`` when it has ``record``.

    Optional, so every :class:`Events` (the terminal, :class:`Logged`, a test's) keeps
    working unchanged; the CLI's ``--events`` and ``--metrics-textfile`` sinks
    (``toolkit/cli/observe.py``) are such subscribers, and the names and fields are
    documented in ``docs/operations.md``."""
    record = getattr(events, "record", None)
    if record is not None:
        record(name, fields)


def subscribed(events: Events) -> bool:
    """Whether anybody takes structured events: what only they are told (the WAL a batch
    wrote) is measured only then, so a run nobody subscribes to pays nothing for it."""
    return getattr(events, "record", None) is not None


class _LoggedProgress:
    def __init__(self, total: int | None, name: str) -> None:
        self.total, self.name, self.done, self.changed = total, name, 0, 0

    def __enter__(self) -> _LoggedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        log.debug("%s: %s of %s keys scanned, %s rows changed", self.name, self.done, self.total,
                  self.changed)

    def update(self, n: int, changed: int = 0) -> None:
        self.done += n
        self.changed += changed


class Logged:
    """The events of a run nobody watches on a terminal: each goes to the logger."""

    secrets: tuple[str, ...] = ()

    def say(self, message: str = "") -> None:
        log.info(message)

    def warn(self, message: str) -> None:
        log.warning(message)

    def note(self, message: str) -> None:
        log.info(message)

    def progress(self, total: int | None, name: str) -> _LoggedProgress:
        return _LoggedProgress(total, name)


LOGGED = Logged()
