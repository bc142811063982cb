"""Waiting on the database's health between batches (the signals: health.py).

Before every batch and schema change the run reads the signals over their limits and, while
one is, waits half a second and reads again, counting the time per signal; Ctrl-C, an abort
(`toolkit control abort`) or the most it may wait in all (``max_throttle_s``) ends a wait.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from toolkit.engine.batches import _sleep
from toolkit.engine.events import emit, progress_every_s
from toolkit.engine.health import (
    POLL_S,
    Baseline,
    Reading,
    baseline,
    check_throttle_query,
    read,
    short_read,
    unreadable,
)
from toolkit.engine.settings import Limits
from toolkit.engine.walrate import WalRate

if TYPE_CHECKING:
    from toolkit.engine.budget import Budget


@dataclass
class Throttle:
    """Waits between batches while the database is unhealthy; counts the time per signal.

    ``budget`` is the run's :class:`~toolkit.engine.budget.Budget`: Ctrl-C ends a wait at
    once, and after ``max_throttle_s`` of waiting in all it is marked throttled out, so the
    run stops at this batch boundary."""

    engine: Engine
    limits: Limits  # the run's options: a `toolkit control set` of a limit is seen at once
    budget: Budget
    poll_s: float = POLL_S
    base: Baseline = field(default_factory=Baseline)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    waited: float = 0.0
    wal: WalRate | None = None  # with --max-wal-rate: the run's samples of the WAL position

    def start(self) -> None:
        """Note the archiver's failures so far; warn once about signals the role cannot read;
        refuse a --throttle-query that does not run."""
        with short_read(self.engine) as conn:
            self.base = baseline(conn)
            if self.limits.max_wal_rate_mb_s is not None:
                self.wal = WalRate(self.limits.max_wal_rate_mb_s)
                self.wal.sample(conn)  # the first sample: the rate is measured from the start
            for warning in unreadable(conn, self.base):
                self.budget.events.warn(f"throttling: {warning}")
        if self.limits.throttle_query:
            check_throttle_query(self.engine, self.limits.throttle_query)

    def over(self, tables: tuple[str, ...]) -> list[Reading]:
        with short_read(self.engine) as conn:
            return [r for r in read(conn, tables, self.limits, self.base, self.wal) if r.over]

    def wait(self, tables: tuple[str, ...], what: str) -> None:
        """Return once every signal is within its limit (or the run is to stop)."""
        current = self.over(tables)
        if not current:
            return
        began = last_note = time.monotonic()
        emit(self.budget.events, "throttle", before=what, state="waiting",
             signals=[{"signal": r.signal, "value": r.value, "limit": r.limit, "detail": r.detail}
                      for r in current])
        self.budget.events.warn(f"waiting before {what}: {_said(current)}")
        every = progress_every_s()
        while current:
            if self.budget.stop_requested:
                return
            control = self.budget.control
            if control is not None:  # a request during the wait: an abort ends it
                if control.due():
                    control.poll()
                if control.aborted is not None:
                    return
            if self.limits.max_throttle_s is not None and self.waited >= self.limits.max_throttle_s:
                self.budget.throttled_out = True
                return
            step = self.poll_s
            if self.limits.max_throttle_s is not None:
                step = max(0.0, min(step, self.limits.max_throttle_s - self.waited))
            slept_from = time.monotonic()
            _sleep(step, self.budget)
            slept = time.monotonic() - slept_from
            self.waited += slept
            for signal in {r.signal for r in current}:
                self.seconds[signal] += slept
            previous = {r.signal for r in current}
            current = self.over(tables)
            now = time.monotonic()
            if current and ({r.signal for r in current} != previous or now - last_note >= every):
                last_note = now
                self.budget.events.note(
                    f"still waiting before {what} ({now - began:.0f} s so far): {_said(current)}"
                )
        emit(self.budget.events, "throttle", before=what, state="resumed",
             seconds=round(time.monotonic() - began, 3), throttled_seconds=self.totals())
        self.budget.events.note(f"resuming {what} after waiting {time.monotonic() - began:.1f} s")

    def totals(self) -> dict[str, float]:
        return {signal: round(seconds, 3) for signal, seconds in self.seconds.items()}


def _said(readings: list[Reading]) -> str:
    return "; ".join(f"{r.signal.replace('_', ' ')}: {r.detail}" for r in readings)
