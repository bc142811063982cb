"""How a pass's progress looks: a bar on a terminal, a line every few seconds elsewhere.

Both say the same things, named the way ``plan``, the pass's closing line and the runbook
name them: the pass (its short name, never its long description, which left an
80-column bar no room for its numbers), the keys of the driving table scanned out of
those the pass covers (what the percentage is of), the rows changed so far (what
``plan`` counts and the closing line reports), the rate, and the time left.

The time left is withheld until a tenth of the keys and a few batches are done: a pass's
first batches are small (the batch size grows toward ``--target-batch-ms``) and its first
keys need not cost what the rest do, and a first estimate from them was six times off.
After that it is estimated from the recent rate, over the latter half of the time the pass
has run (at most :data:`WINDOW_S`), which leaves the start behind as the batch size
settles, rather than from the average since the start.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

ESTIMATE_AFTER_SHARE = 0.10  # of the pass's keys scanned before a time left is given
ESTIMATE_AFTER_BATCHES = 3
WINDOW_S = 300.0  # the longest stretch the recent rate is measured over
LABEL_MAX = 30  # the longest pass label; a longer name is shortened in its middle
# What a bar line needs besides its label and the bar itself, at its longest:
# " 100%|" "|" " 1.17M/1.17M keys, 34.5k/s, 1:02:03 left" plus a bar of a few characters.
BAR_STATS_WIDTH = 50


def label(name: str, width: int = LABEL_MAX) -> str:
    """The pass name, shortened in the middle (its end tells ``:revert`` passes apart)."""
    if len(name) <= width:
        return name
    tail = (width - 1) * 3 // 5
    return f"{name[: width - 1 - tail]}…{name[-tail:]}"


def estimable(done: int, total: int | None, batches: int) -> bool:
    """Whether enough of the pass has run for its time left to mean something."""
    return bool(total) and batches >= ESTIMATE_AFTER_BATCHES and done >= ESTIMATE_AFTER_SHARE * (total or 0)


def compact(n: float) -> str:
    """12,345 -> 12.3k; small counts as they are (tqdm's 4.00 for 4 reads as a fraction)."""
    if n < 10_000:
        return f"{n:,.0f}"
    return tqdm.format_sizeof(n)


@dataclass
class Tally:
    """What a pass has done so far, and its recent rate."""

    total: int | None
    clock: Callable[[], float] = time.monotonic
    done: int = 0  # keys scanned
    changed: int = 0  # rows changed
    batches: int = 0
    started: float = 0.0
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (when, keys done then)

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.recent.append((self.started, 0))

    def add(self, scanned: int, changed: int) -> float:
        self.done += scanned
        self.changed += changed
        self.batches += 1
        now = self.clock()
        self.recent.append((now, self.done))
        return now

    def rate(self, now: float) -> float:
        """Keys per second over the latter half of the time the pass has run (at most the
        last WINDOW_S): from the last batch that ended before that stretch began."""
        horizon = max(self.started + (now - self.started) / 2, now - WINDOW_S)
        while len(self.recent) > 1 and self.recent[1][0] <= horizon:
            self.recent.popleft()
        since, then = self.recent[0]
        return (self.done - then) / max(now - since, 1e-9)

    def seconds_left(self, now: float) -> float | None:
        if self.total and self.done >= self.total:
            return 0.0
        if not self.total or not estimable(self.done, self.total, self.batches):
            return None
        rate = self.rate(now)
        return max(self.total - self.done, 0) / rate if rate > 0 else None


@dataclass
class ProgressLines:
    """Off a terminal, every ``every_s`` seconds:

    ``progress: link-candidates: 12,000 of 45,000 keys scanned (27%), 3,100 rows changed,
    3,400 keys/s, about 10 s left`` (``time left not yet estimated`` before a tenth)."""

    write: Callable[[str], None]
    name: str
    total: int | None
    every_s: float
    clock: Callable[[], float] = time.monotonic
    tally: Tally = field(init=False)
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.tally = Tally(self.total, self.clock)
        self.last = self.tally.started

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int, changed: int = 0) -> None:
        now = self.tally.add(n, changed)
        if now - self.last >= self.every_s:
            self.last = now
            self.write(self.line(now))

    def line(self, now: float) -> str:
        t = self.tally
        rate = f"{t.rate(now):,.0f} keys/s"
        changed = f"{t.changed:,} rows changed"
        if not self.total:
            return f"progress: {self.name}: {t.done:,} keys scanned, {changed}, {rate}"
        left = t.seconds_left(now)
        eta = "time left not yet estimated" if left is None else f"about {left:,.0f} s left"
        return (f"progress: {self.name}: {t.done:,} of {self.total:,} keys scanned "
                f"({100 * t.done / self.total:.0f}%), {changed}, {rate}, {eta}")


class _Bar(tqdm):
    """tqdm, with a line that keeps the label, percentage, rate and time left in the width
    (tqdm cuts a line too long at its end, where the rate and time left are)."""

    def __init__(self, *args: Any, name: str, tally: Tally, **kwargs: Any) -> None:
        self.pass_name, self.tally = name, tally
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        d = super().format_dict
        if not hasattr(self, "tally"):  # tqdm reads it once before __init__ is through
            return d
        ncols = d.get("ncols") or 80
        width = max(8, min(LABEL_MAX, ncols - BAR_STATS_WIDTH))
        total = self.total or 0
        rate = d.get("rate")
        left = self.tally.seconds_left(self.tally.clock())
        if left is not None and rate:  # the bar's own rate, smoothed, once an estimate is due
            left = max(total - self.n, 0) / rate
        d["prefix"] = label(self.pass_name, width)
        d["done"] = f"{compact(self.n)}/{compact(total)} keys"
        d["speed"] = f"{compact(rate)}/s" if rate else "?/s"
        d["left"] = f"{tqdm.format_interval(left)} left" if left is not None else "time left ?"
        return d


@dataclass
class PassBar:
    """A terminal's bar for one pass: ``link-candidates  27%|███   | 12.0k/45.0k keys,
    3.40k/s, 00:10 left``; the rows changed so far are shown in the pass's closing line."""

    stream: Any
    name: str
    total: int | None
    disable: bool = False
    tally: Tally = field(init=False)
    bar: tqdm = field(init=False)

    def __post_init__(self) -> None:
        self.tally = Tally(self.total)
        self.bar = _Bar(total=self.total, file=self.stream, disable=self.disable, leave=False,
                        dynamic_ncols=True, unit=" keys", name=self.name, tally=self.tally,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {done}, {speed}, {left}")

    def __enter__(self) -> PassBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def update(self, n: int, changed: int = 0) -> None:
        self.tally.add(n, changed)
        self.bar.update(n)

