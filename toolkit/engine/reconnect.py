"""``--reconnect N``: a run the database ended the session of (restart, failover, a
terminated session) is run again, resuming from its last committed batch on whichever host
is the primary by then."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from toolkit.db import cannot_connect, session_lost
from toolkit.engine.events import Events
from toolkit.engine.lease import HoldLost
from toolkit.engine.rewind import Memory
from toolkit.engine.settings import MAX_RECONNECT_DELAY_S, RunOptions
from toolkit.errors import SessionLost

T = TypeVar("T")


def reconnecting(engine: Engine, options: RunOptions, events: Events, memory: Memory,
                 attempt: Callable[[bool], T]) -> T:
    """Run ``attempt`` (told whether it is the first) and, with ``--reconnect N``, run it
    again after the database ended the session, waiting longer each time. Given up, the
    batches this process committed are kept on this machine (``memory``): the next run from
    here checks the database still has them."""
    tries = 0
    while True:
        try:
            return attempt(tries == 0)
        except (SessionLost, DBAPIError) as exc:
            why = why_retry(exc)
            if why is None or tries >= options.reconnect:
                if why is not None:  # the next run from here checks what this one committed
                    memory.save(engine.url)
                raise
        tries += 1
        delay = min(options.reconnect_backoff_s * 2 ** (tries - 1), MAX_RECONNECT_DELAY_S)
        events.warn(f"{why}; reconnecting in {delay:.1f}s to resume "
                    f"(attempt {tries} of {options.reconnect})")
        engine.dispose()
        time.sleep(delay)


def why_retry(exc: Exception) -> str | None:
    """Why another attempt may succeed, or None when it would not (an error that is not a
    lost session, or a lease another run took over)."""
    if isinstance(exc, HoldLost):
        return None if exc.taken_over else "the runner lock's session ended"
    if isinstance(exc, SessionLost):
        return exc.problem
    if cannot_connect(exc):
        return "the database cannot be reached"
    return session_lost(exc, during_run=True)
