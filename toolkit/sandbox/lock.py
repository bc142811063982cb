"""Who is using a sandbox: a lock every toolkit run on it holds for as long as it runs.

``sandbox seed`` and ``demo`` replace the sandbox's database as a whole (DROP DATABASE ...
WITH (FORCE)), which pulls it from under anything else using it: a second demo, a
``migrate`` or an ``mlflow serve`` on the sandbox. They take the lock exclusively; every
other command whose database is the sandbox (no database given) takes it shared. Whoever
cannot have it is refused in one line that names the run holding it.

The lock is ``flock(2)`` on ``toolkit.lock`` in the sandbox directory: the kernel drops it
when the process ends, however it ends (``kill -9`` included), so a crashed run never
leaves the sandbox locked. To name the holders, each run also keeps a small file of its own
under ``runs/`` (pid, command, start time), itself flocked for the run's life: a file whose
lock anyone can take is left over from a run that ended, and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import SandboxBusy

LOCK_FILE = "toolkit.lock"
RUNS_DIR = "runs"
_serial = itertools.count()  # two holds in one process (tests run commands in-process)


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    since: str

    def describe(self) -> str:
        return f"`{self.command}` (pid {self.pid}, since {self.since})"


def holders(data_dir: Path) -> list[Holder]:
    """The runs holding the sandbox now, oldest first; files of ended runs are removed."""
    found: list[Holder] = []
    for path in sorted((data_dir / RUNS_DIR).glob("*.run")):
        with contextlib.suppress(OSError), open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its run holds it: alive
                pid, command, since = ([*handle.read().split("\t"), "", "", ""])[:3]
                if pid.isdigit():
                    found.append(Holder(int(pid), command, since.strip()))
                continue
            path.unlink(missing_ok=True)  # nobody holds it: a run that ended
    return found


@contextlib.contextmanager
def hold(data_dir: Path, command: str, *, exclusive: bool) -> Iterator[None]:
    """Hold the sandbox in ``data_dir`` for the block, or raise :class:`SandboxBusy`.

    ``exclusive`` for the runs that replace its database (seed, demo); shared for the
    others, which may run side by side.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    runs = data_dir / RUNS_DIR
    runs.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        gate = stack.enter_context(open(data_dir / LOCK_FILE, "a"))
        try:
            fcntl.flock(gate, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(data_dir, command, exclusive) from None
        # Written under a temporary name, then renamed: whoever lists the holders never sees
        # a file that is not yet locked (and would take it for one left over).
        name = f"{os.getpid()}-{next(_serial)}"
        pending = runs / f"{name}.new"
        mine = stack.enter_context(open(pending, "w"))
        fcntl.flock(mine, fcntl.LOCK_EX)
        mine.write(f"{os.getpid()}\t{command}\t{time.strftime('%H:%M:%S %Z')}")
        mine.flush()
        final = runs / f"{name}.run"
        pending.rename(final)
        stack.callback(final.unlink, missing_ok=True)
        yield


def _busy(data_dir: Path, command: str, exclusive: bool) -> SandboxBusy:
    others = holders(data_dir)
    who = ", ".join(h.describe() for h in others) if others else "another toolkit run"
    if exclusive:
        problem = (f"The sandbox in {data_dir} is in use by {who}; `{command}` would replace its "
                   "database under that run")
    else:
        problem = (f"The sandbox in {data_dir} is held by {who}, which replaces its database; "
                   f"`{command}` would use it mid-change")
    return SandboxBusy(
        problem,
        f"wait for it to end, or use a sandbox of your own: TOOLKIT_SANDBOX_DIR=DIR {command}",
        details={"data_dir": str(data_dir),
                 "holders": [{"pid": h.pid, "command": h.command, "since": h.since} for h in others]},
    )
