"""Ctrl-C and SIGTERM during a run: a stop within a second, always exit 130.

The first signal asks the run to stop at the next batch boundary. A batch normally ends
well within :data:`GRACE_S`; a statement still on the server by then (a schema change
waiting for its lock, CREATE INDEX CONCURRENTLY waiting for an old snapshot, a long
batch) is cancelled on the server (:mod:`toolkit.cancel`), its transaction rolled back.
A second signal cancels it at once, or, when nothing is on the server, aborts the
Python side (``KeyboardInterrupt``); a third always does. Either way the run ends as a stop: history records
``interrupted`` and the exit code is 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from toolkit.cancel import IN_FLIGHT
from toolkit.engine.budget import Budget

# How long the first signal lets a statement already on the server finish before it is
# cancelled: a batch is sized to take far less, and a stop must act within a second.
GRACE_S = 0.5


def _in_background(work: object, delay: float = 0.0) -> None:
    """Send the cancel from another thread: the handler returns at once, and the main
    thread's driver sees the statement end."""
    timer = threading.Timer(delay, work)  # type: ignore[arg-type]
    timer.daemon = True
    timer.start()


@contextmanager
def stop_on_signals(budget: Budget) -> Iterator[None]:
    """First Ctrl-C (or SIGTERM): stop at the batch boundary, cancelling within GRACE_S what
    is still on the server. Second: cancel now (or abort, when nothing is on the server)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received = [0]

    def handler(signum: int, frame: object) -> None:
        received[0] += 1
        if budget.stop_requested:
            # A third signal aborts whatever the second found on the server (should a
            # cancel not end it, or a connection it found be idle by now).
            if IN_FLIGHT.any() and received[0] == 2:
                _in_background(IN_FLIGHT.cancel)
                return
            raise KeyboardInterrupt
        budget.stop_requested = True
        on_server = IN_FLIGHT.snapshot()
        if on_server:
            _in_background(lambda: IN_FLIGHT.cancel(on_server), GRACE_S)
        budget.events.warn(
            "stopping after the current batch; a statement still running on the server in "
            f"{GRACE_S:g} s is cancelled (rolled back); a second Ctrl-C cancels it now")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
