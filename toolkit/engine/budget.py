"""How much of a run's work to do now, and what steers it while it runs.

Read by the batch loop, the schema changes and the signal handlers; kept apart from them
so that none of them imports another to learn when to stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from toolkit.engine.events import LOGGED, Events
from toolkit.engine.settings import RunOptions

if TYPE_CHECKING:  # both read the budget; typed here, imported only by the type checker
    from toolkit.engine.control import Steering
    from toolkit.engine.throttle import Throttle


@dataclass
class Budget:
    """How much of the work to do now (``--max-batches``, ``--max-runtime``, Ctrl-C)."""

    options: RunOptions
    started: float = field(default_factory=time.monotonic)
    batches: int = 0
    stop_requested: bool = False
    # The run's throttle (None: no throttling), and whether it waited its maximum.
    throttle: Throttle | None = None
    throttled_out: bool = False
    events: Events = LOGGED  # where the run's progress and warnings go
    # Told (milestone, step, last key) after each batch commits: what the run remembers
    # to tell, once resumed, whether committed batches went back in time (rewind.py).
    on_commit: Callable[[str, str, int], None] | None = None
    retries: int = 0  # retries of the batch under way (told with the batch, in its event)
    # The run's control.Steering (None: not steered): `toolkit control` requests, read at
    # every batch boundary and during every wait.
    control: Steering | None = None

    def steer(self) -> None:
        """At a batch boundary: take `toolkit control` requests; wait here while paused."""
        if self.control is not None and not self.stop_requested:
            self.control.boundary()

    def exhausted_reason(self) -> str | None:
        if self.stop_requested:
            return "interrupted"
        if self.throttled_out:
            return "throttled"
        if self.control is not None and self.control.aborted is not None:
            return "aborted"
        if self.options.max_batches is not None and self.batches >= self.options.max_batches:
            return "max-batches"
        if (self.options.max_runtime_s is not None
                and time.monotonic() - self.started >= self.options.max_runtime_s):
            return "max-runtime"
        return None
