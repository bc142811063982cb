"""How many keys the next batch takes.

A fixed size is wrong for every pass but one: five thousand keys take 30 ms in one pass
of milestone 4 and three seconds in milestone 3. Short batches pay a commit, a checkpoint
and a key lookup each time for little work; long ones hold their row locks, and keep
GitLab's updates of those rows waiting, for as long as they run. So, as GitLab's batched
background migrations do, the size follows a time budget per batch: after each batch the
cost of one key is estimated (smoothed, so one slow batch does not halve the next), and
the next size is the budget divided by it, changed at most by half or double per batch
and kept between a floor and a ceiling.

With no budget the size stays what the operator asked for, batch after batch.
"""

from __future__ import annotations

from dataclasses import dataclass

# How much the newest batch counts in the estimate of one key's cost.
SMOOTHING = 0.5
MOST_SHRINK = 0.5
MOST_GROWTH = 2.0


@dataclass
class BatchSizer:
    size: int
    target_ms: int | None = None
    smallest: int = 100
    largest: int = 50_000
    _seconds_per_key: float | None = None

    def __post_init__(self) -> None:
        # An operator's first size outside the bounds widens them rather than being overridden.
        self.smallest = min(self.smallest, self.size)
        self.largest = max(self.largest, self.size)

    def record(self, seconds: float, keys: int) -> int:
        """Take the duration of the batch just done; return the size of the next one."""
        if not self.target_ms or keys <= 0:
            return self.size
        # A batch shorter than its size (the end of the pass) still tells the cost of a key.
        observed = seconds / keys
        estimate = (observed if self._seconds_per_key is None
                    else SMOOTHING * observed + (1 - SMOOTHING) * self._seconds_per_key)
        self._seconds_per_key = estimate
        wanted = self.target_ms / 1000 / estimate if estimate > 0 else self.size * MOST_GROWTH
        wanted = min(max(wanted, self.size * MOST_SHRINK), self.size * MOST_GROWTH)
        self.size = self._bounded(round(wanted))
        return self.size

    def _bounded(self, size: int) -> int:
        return min(max(size, self.smallest), self.largest)
