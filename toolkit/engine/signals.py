"""Ctrl-C and SIGTERM during a run: the first stops at the next batch boundary."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from toolkit.engine.batches import Budget


@contextmanager
def stop_on_signals(budget: Budget) -> Iterator[None]:
    """First Ctrl-C (or SIGTERM): finish the current batch, then stop. Second: abort it now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if budget.stop_requested:
            raise KeyboardInterrupt
        budget.stop_requested = True
        budget.events.warn(
            "stopping after the current batch (Ctrl-C again aborts it; it would be rolled back)"
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
