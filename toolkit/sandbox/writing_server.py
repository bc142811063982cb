"""``toolkit mlflow serve --allow-writes`` as a process of its own, for the training
workload of ``toolkit demo`` and ``scripts/bench.py``.

A process (not a thread of the caller) because the workload's clients must meet the
server an operator runs, with its own database pool, and because the caller's own work
(a milestone's batches) must not share its interpreter. A server that will not start
with writes (an older toolkit, a database it refuses) is reported, not raised: the demo
says what happened and goes on.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 60


@dataclass
class WritingServer:
    """The server's http://HOST:PORT, or why there is none (``problem``)."""

    address: str | None
    problem: str | None
    log: Path


@contextmanager
def writing_server(database_url: str, log: Path, *extra: str) -> Iterator[WritingServer]:
    """Start the server on a free port; stop it with SIGTERM at the end. Its stderr (the
    access log, a line per request) goes to ``log``."""
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "toolkit", "--database-url", database_url, "mlflow", "serve",
             "--port", "0", "--allow-writes", *extra],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
    address = None
    timer = threading.Timer(STARTUP_TIMEOUT_S, process.kill)  # a server that never says where
    timer.start()
    try:
        assert process.stdout is not None  # stdout=PIPE
        for line in process.stdout:
            if line.startswith("Serving "):
                address = line.split(" at ")[1].split()[0]
            if line.startswith("Ctrl-C"):
                break
    finally:
        timer.cancel()
    try:
        if address is None:
            process.wait(timeout=30)
            said = [line for line in log.read_text().splitlines() if line.strip()]
            yield WritingServer(None, said[-1] if said else f"it exited with {process.returncode}", log)
        else:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # nobody reads it else
            yield WritingServer(address, None, log)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
