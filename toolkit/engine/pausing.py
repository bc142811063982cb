"""Waiting in small steps, so that a stop (Ctrl-C, SIGTERM) during a wait ends it at once.

Used by every wait of a run: between batches (``--pause-ms``), before a retry, while the
throttle waits for the database's health, and while a pause or a hold keeps the run at a
batch boundary. It asks the run's budget only whether a stop was requested.
"""

from __future__ import annotations

import time
from typing import Protocol


class Stoppable(Protocol):
    @property
    def stop_requested(self) -> bool: ...


def pause(seconds: float, budget: Stoppable) -> None:
    """Sleep ``seconds`` in steps of at most 50 ms, ending early once a stop is requested."""
    deadline = time.monotonic() + seconds
    while not budget.stop_requested and time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
