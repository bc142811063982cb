"""One sandbox, several toolkit runs: `seed` and `demo` refuse while another run holds it,
and a demo whose database is replaced under it fails instead of saying every check held.

The two-demo case runs as an operator meets it: real processes on one TOOLKIT_SANDBOX_DIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from toolkit.errors import ExitCode, SandboxBusy
from toolkit.sandbox.database import seed_sandbox
from toolkit.sandbox.lock import RUNS_DIR, hold, holders
from toolkit.sandbox.server import SandboxServer


def _toolkit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, **kwargs)


class Demo:
    """``toolkit demo`` as a process of its own, its output read as it comes."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "toolkit", "demo"], text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.reached = threading.Event()
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("3. Apply"):  # seeded, and the milestones begin
                self.reached.set()
        self.reached.set()

    def wait_until_applying(self) -> None:
        self.reached.wait(timeout=300)
        assert self.process.poll() is None, ("the demo ended early", self.lines, self.process.stderr.read())

    def finish(self) -> int:
        code = self.process.wait(timeout=300)
        self.stderr = self.process.stderr.read()
        return code


def test_two_demos_on_one_sandbox(sandbox_dir):
    first = Demo()
    try:
        first.wait_until_applying()
        holder = f"`toolkit demo` (pid {first.process.pid}, since "

        second = _toolkit("demo")
        assert second.returncode == ExitCode.BUSY, (second.stdout, second.stderr)
        assert second.stdout == "" and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"error: The sandbox in {sandbox_dir} is in use by {holder}")
        assert "TOOLKIT_SANDBOX_DIR=DIR toolkit demo" in second.stderr

        seed = _toolkit("sandbox", "seed")
        assert seed.returncode == ExitCode.BUSY and holder in seed.stderr, seed.stderr
        assert seed.stderr.count("\n") == 1

        # a command whose database is the sandbox (none given) waits its turn too
        status = _toolkit("status")
        assert status.returncode == ExitCode.BUSY and holder in status.stderr, status.stderr

        # The database replaced under the demo by something that does not take the lock (by
        # hand, an older toolkit): the demo must fail, not report that every check held.
        assert first.process.poll() is None, "the demo ended before its database could be replaced"
        seed_sandbox(SandboxServer(sandbox_dir).status(), "small", "realistic", 1)
        code = first.finish()
    finally:
        if first.process.poll() is None:
            first.process.kill()
            first.process.wait()
    output = "".join(first.lines)
    assert code == ExitCode.VERIFY_FAILED, (output, first.stderr)
    assert "Every check held" not in output
    assert "error: The sandbox database gitlab_sandbox was replaced while this run used it" \
        in first.stderr, first.stderr

    # the lock died with the demo's process: the sandbox is free again
    again = _toolkit("sandbox", "seed")
    assert again.returncode == 0, again.stderr


def test_runs_that_only_use_the_sandbox_share_it_and_block_a_seed(tmp_path):
    with hold(tmp_path, "toolkit mlflow serve", exclusive=False), \
            hold(tmp_path, "toolkit status", exclusive=False):
        assert sorted(h.command for h in holders(tmp_path)) == ["toolkit mlflow serve", "toolkit status"]
        with pytest.raises(SandboxBusy) as refused, hold(tmp_path, "toolkit sandbox seed", exclusive=True):
            pass
        problem = refused.value.problem
        assert "`toolkit mlflow serve` (pid " in problem and "`toolkit status` (pid " in problem
        assert refused.value.exit_code == ExitCode.BUSY
    assert holders(tmp_path) == []
    with hold(tmp_path, "toolkit sandbox seed", exclusive=True), \
            pytest.raises(SandboxBusy, match=r"held by `toolkit sandbox seed` \(pid \d+"), \
            hold(tmp_path, "toolkit status", exclusive=False):
        pass


def test_a_run_killed_leaves_nothing_that_blocks(tmp_path):
    """kill -9 of a holder: the kernel drops its lock; its file is taken for left over."""
    code = ("import sys, time; from pathlib import Path; from toolkit.sandbox.lock import hold\n"
            "with hold(Path(sys.argv[1]), 'toolkit demo', exclusive=True):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline() == "held\n"
        assert [h.pid for h in holders(tmp_path)] == [process.pid]
    finally:
        process.kill()
        process.wait()
    assert len(list((tmp_path / RUNS_DIR).glob("*.run"))) == 1  # its file stayed behind
    with hold(tmp_path, "toolkit sandbox seed", exclusive=True):
        assert [h.pid for h in holders(tmp_path)] == [os.getpid()]
    assert list(Path(tmp_path / RUNS_DIR).glob("*.run")) == []
