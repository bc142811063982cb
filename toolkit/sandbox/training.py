"""A training workload: real MLflow clients writing through ``toolkit mlflow serve
--allow-writes`` while an operator migrates, and a checker that reads every write back.

What an MLflow user of GitLab most needs to know is whether a training job keeps working
while the blueprint runs. So the workload is the real client (``mlflow`` in the venv),
``N`` processes of it, each looping as a training script does: ``set_experiment`` (new
names and existing ones, the awkward kinds GitLab meets: unicode, emoji, spaces, 255
characters, names that slug to nothing, pairs that collide once slugged), ``start_run``
(with a ``run_name`` or without), params, a metric over steps, ``log_batch``, tags, the
end of the run; and every third time a registered model, a version and
``get_latest_versions``.

Each process appends one JSON line per call to its journal (flushed per line, so a
process killed mid-way leaves every acknowledged write it made): ``ok`` when the client
returned without an error (the write is *acknowledged*: it must be read back), else the
error. A 503 the client retries is not an error; each retry the client makes is
journaled with its status (``op: retry``), so the checker can tell the documented 503s
from any other 5xx. Each line carries the call's start (``t``, epoch seconds) and its
latency (``ms``), which ``scripts/bench.py`` splits by milestone.

:func:`~toolkit.sandbox.training_readback.read_back` then reads every acknowledged write
through the client and counts what is lost (absent or different) and what is duplicated
(a run made twice where the client made it once, a metric step written twice). Everything
the workers choose comes from ``random.Random`` seeded by the seed and the worker's number.

This module runs ``N`` clients (:class:`Workload`) and is their command line; one client is
:mod:`toolkit.sandbox.training_client`, the journal they keep
:mod:`toolkit.sandbox.training_journal`, the checker :mod:`toolkit.sandbox.training_readback`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.sandbox.training_client import worker_main
from toolkit.sandbox.training_journal import CLIENT_ENV, read_journals
from toolkit.sandbox.training_readback import read_back


@dataclass
class Workload:
    """``clients`` worker processes against ``server`` (http://HOST:PORT), spread over
    ``projects``; ``start()``, then ``stop()`` (a stop file each checks between
    iterations). Journals go to ``folder``."""

    server: str
    projects: list[int]
    clients: int = 2
    seed: int = 1
    folder: Path = None  # type: ignore[assignment]  # a temporary folder when not given
    token: str | None = None
    pause_s: float = 0.05
    iterations: int | None = None
    label: str = ""  # in every name it makes: two workloads on one database make different ones
    env: dict[str, str] = field(default_factory=dict)  # over CLIENT_ENV (e.g. fewer retries)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="toolkit-training-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stop_file = self.folder / "stop"
        self.pause_file = self.folder / "pause"
        self.pauses = 0

    @property
    def journals(self) -> list[Path]:
        return [self.folder / f"client-{i}.jsonl" for i in range(self.clients)]

    def start(self) -> Workload:
        self.stop_file.unlink(missing_ok=True)
        self.pause_file.unlink(missing_ok=True)
        env = {**os.environ, **CLIENT_ENV, "MLFLOW_ENABLE_ASYNC_LOGGING": "false", **self.env}
        env.pop("MLFLOW_TRACKING_URI", None)
        if self.token:
            env["MLFLOW_TRACKING_TOKEN"] = self.token
        for i, journal in enumerate(self.journals):
            config = {"worker": i, "seed": self.seed, "server": self.server, "journal": str(journal),
                      "project": self.projects[i % len(self.projects)], "stop_file": str(self.stop_file),
                      "pause_file": str(self.pause_file),
                      "pause_s": self.pause_s, "iterations": self.iterations, "label": self.label}
            with (self.folder / f"client-{i}.stderr").open("w") as err:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "toolkit.sandbox.training", "worker", json.dumps(config)],
                    env=env, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL))
        return self

    def pause(self, timeout_s: float = 120) -> None:
        """Hold every client between two iterations, no run of theirs open; returns once all
        are held (a fingerprint taken then has no run the clients will still change)."""
        self.pauses += 1
        generation = str(self.pauses)
        written = self.pause_file.with_suffix(".new")
        written.write_text(generation)
        written.replace(self.pause_file)  # whole, never read half-written
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            held = {e["worker"] for e in read_journals(self.journals)
                    if e.get("op") == "paused" and e["generation"] == generation}
            if len(held) == self.clients:
                return
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError("a training client ended while it was asked to pause")
            time.sleep(0.05)
        raise TimeoutError(f"the training clients did not pause within {timeout_s}s")

    def resume(self) -> None:
        self.pause_file.unlink(missing_ok=True)

    def stop(self, timeout_s: float = 180) -> list[int]:
        """Ask every client to stop after its current iteration; their exit codes."""
        self.stop_file.touch()
        return [p.wait(timeout=timeout_s) for p in self.processes]

    def wait(self, timeout_s: float = 300) -> list[int]:
        return [p.wait(timeout=timeout_s) for p in self.processes]

    def calls(self) -> int:
        return sum(1 for entry in read_journals(self.journals) if entry.get("ok") is not None)

    def __enter__(self) -> Workload:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop_file.touch()
        for process in self.processes:
            try:
                process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def first_runs(workload: Workload, timeout_s: float = 90, refused_after: int = 3) -> str | None:
    """Wait until every client has ended a run: None then, else why not (the server refused
    the writes: ``refused_after`` failed set_experiment calls and no experiment set; the
    clients ended; the time ran out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = list(read_journals(workload.journals))
        if len({e["worker"] for e in entries if e.get("op") == "ended"}) == workload.clients:
            return None
        failed = [e for e in entries if e.get("op") == "set_experiment" and e.get("ok") is False]
        if len(failed) >= refused_after and not any(e.get("op") == "experiment" for e in entries):
            return f"the server refused them ({failed[0]['error'][:200]})"
        if all(p.poll() is not None for p in workload.processes):
            return "the clients ended before they wrote"
        time.sleep(0.2)
    return f"the clients wrote no run in {timeout_s:.0f}s"


def main(argv: list[str] | None = None) -> int:
    """``python -m toolkit.sandbox.training run URL --projects 1,2 [--clients N] [--seconds S]``:
    the workload against a server for S seconds, then read back, the report as JSON (exit 1
    when a write was lost or duplicated, or a 5xx other than 503 was seen). ``worker`` is
    how :class:`Workload` starts each client."""
    parser = argparse.ArgumentParser(description="the training workload of toolkit.sandbox.training")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker")
    worker.add_argument("config")
    run = commands.add_parser("run", help="run N clients against a server, then read every write back")
    run.add_argument("server", help="http://HOST:PORT of `toolkit mlflow serve --allow-writes`")
    run.add_argument("--projects", required=True, help="project ids, comma-separated")
    run.add_argument("--clients", type=int, default=2)
    run.add_argument("--seconds", type=float, default=30)
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--label", default="", help="in every name made (a second run on the same database)")
    run.add_argument("--journals", type=Path, default=None,
                     help="folder for the journals (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker_main(json.loads(args.config))
    projects = [int(p) for p in args.projects.split(",")]
    workload = Workload(args.server.rstrip("/"), projects, clients=args.clients, seed=args.seed,
                        folder=args.journals, label=args.label, token=os.environ.get("MLFLOW_TRACKING_TOKEN"))
    with workload:
        time.sleep(args.seconds)
    report = read_back(workload.server, workload.journals, token=workload.token)
    print(json.dumps({"summary": report.summary(), "journals": str(workload.folder), **report.as_dict()},
                     indent=2, ensure_ascii=False))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
