"""The WAL rate signal (``--max-wal-rate``): how fast the primary writes WAL, over a window.

GitLab's ``WalRate`` health indicator pauses batched background migrations while the
primary writes WAL faster than a limit: WAL, not rows, is what replicas, archiving and a
DR site across a slow link pay for (pgroll #168). A replica-lag limit only fires once a
replica is already behind, and a run with no replica attached (or an archive across the
WAN) has none to fire.

The rate is measured from the primary's WAL insert position (as ``state.save_checkpoint``
reads it for each batch's WAL bytes), sampled at every health read: at each batch boundary
and every poll of a wait. The rate is the bytes between the newest sample and the latest
one at least ``WINDOW_S`` older (the oldest, early in a run), over the time between them:
the server's WAL, so what other sessions write counts too, as it does for a replica. A wait
ends once the window holds less than the limit's worth, at most about ``WINDOW_S`` after
the last batch if the run was the only writer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

MB = 1024 * 1024  # as the toolkit's sizes elsewhere (health.size): 1 MB = 1024 kB
WINDOW_S = 5.0  # long enough to span several batches, short enough that a wait is seconds
SIGNAL = "wal_rate"


@dataclass
class Sample:
    at: float  # monotonic seconds
    position: int  # WAL insert position, bytes


@dataclass
class WalRate:
    """Samples of the WAL insert position, oldest first, covering at least the window."""

    limit_mb_s: float
    window_s: float = WINDOW_S
    clock: Callable[[], float] = time.monotonic
    samples: deque[Sample] = field(default_factory=deque)

    def add(self, position: int) -> None:
        now = self.clock()
        self.samples.append(Sample(now, position))
        # keep one sample at or before the window's start, as the rate's anchor
        while len(self.samples) > 2 and self.samples[1].at <= now - self.window_s:
            self.samples.popleft()

    def rate_mb_s(self) -> float | None:
        """MB/s over the window; None before two samples a measurable time apart."""
        if len(self.samples) < 2:
            return None
        first, last = self.samples[0], self.samples[-1]
        span = last.at - first.at
        if span <= 0:
            return None
        return max(0, last.position - first.position) / MB / span

    def span_s(self) -> float:
        return self.samples[-1].at - self.samples[0].at if self.samples else 0.0

    def sample(self, conn: Connection) -> bool:
        """Add a sample of the insert position now; False on a standby (it writes no WAL)."""
        position = conn.execute(sa.text("SELECT CASE WHEN NOT pg_is_in_recovery() "
                                        "THEN pg_current_wal_insert_lsn() - '0/0' END")).scalar()
        if position is None:
            return False
        self.add(int(position))
        return True
