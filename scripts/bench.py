"""Benchmark: each milestone's whole command vs. the same change as one set-based statement
and vs. the change written by hand.

    python scripts/bench.py --scale gitlab-com   # about five minutes on a quiet machine
    python scripts/bench.py --scale x25          # see docs/benchmarks/README.md
    python scripts/bench.py --replica-lag        # each milestone's replica lag, throttled or not
    python scripts/bench.py --mlflow-clients 4   # and training clients write through the server

Batches are sized as ``toolkit migrate`` sizes them by default (toward a second each);
``--batch-size N`` fixes the size instead, ``--target-batch-ms`` changes the budget.

Builds a sandbox at the scale (its own data directory, never the default sandbox). Then,
for each milestone in order:

* the **baseline**: a copy of the database (CREATE DATABASE … TEMPLATE) gets the same
  change with every pass done as one batch, i.e. one set-based statement per pass;
* the **batched** apply, as an operator runs it: the whole ``toolkit --json migrate
  MILESTONE --yes`` command (scripts/bench_command.py), timed from process start to exit,
  on another copy made the same way, which then replaces the original;
* the change **written by hand** (scripts/bench_hand.py: bare, online, guarded, guarded
  with the undo ledger), each on a copy made the same way, checked to leave the rows the
  toolkit leaves; each milestone's whole command is then split into parts, each one
  measured variant less the one before (:func:`breakdown`);
* each kind ``--repeat`` times (default 3), in an order that rotates, each on a fresh copy; the
  median run of each counts and the table shows the spread: on a 2-core virtual machine
  one run varies by a tenth, as much as the margin the ratio target leaves;
* before them all, ``VACUUM (ANALYZE)`` and a ``CHECKPOINT``, untimed: a GitLab database is
  vacuumed routinely, and autovacuum catching up on freshly loaded or updated tables, or
  the checkpointer writing what the other run dirtied, would otherwise land in whichever
  run comes second;
* during each, the application-like writer of ``toolkit/sandbox/app_writer.py`` (the one
  the tests run) logs a run every 20 ms, with an experiment while GitLab still creates
  them; its latencies give the p99 GitLab's traffic would see;
* with ``--mlflow-clients N``, during each as well: ``N`` processes of the training workload
  (``toolkit/sandbox/training.py``, the real MLflow client) write through ``toolkit mlflow
  serve --allow-writes`` on the copy being migrated, each call timed in the client; the
  write p50/p99 during the migrate, the 503s the clients retried, and whether every
  acknowledged write read back are reported per milestone, and the ratios are then the
  ratios with the workload running.

Last, milestone 1's whole command on the same data seeded with 1 metric row per candidate
instead of 10, alternating the two on fresh copies of each pristine seed: it never writes
a metric, so the proof must not make it pay for them.

It also times ``toolkit plan`` and ``toolkit verify`` (run as the operator runs them, each
its own process whose peak memory is read) and the benchmark process's own peak. Results go to
``bench-results/<scale>.json`` and a markdown table ``bench-results/<scale>.md``; the
figure that counts is the throughput ratio batched / set-based, measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, however it is run

import bench_hand
import bench_observe

from toolkit import milestones as registry
from toolkit.db import create_engine
from toolkit.engine.runner import Runner
from toolkit.engine.settings import RunOptions, batch_target
from toolkit.errors import ExitCode, PreconditionRefused
from toolkit.sandbox.app_writer import AppWriter, as_ms, percentile
from toolkit.sandbox.scales import SCALES
from toolkit.sandbox.server import SUPERUSER, SandboxServer, _bin
from toolkit.sandbox.training import Workload, first_runs
from toolkit.sandbox.training_journal import read_journals, write_latencies
from toolkit.sandbox.training_readback import read_back
from toolkit.sandbox.writing_server import writing_server


def migrate_worker(url: str, milestone: str, options: str, out: str, whole: str) -> None:
    """In a process of its own (``--migrate-worker``): one timed migrate, as the toolkit runs
    it, its batches written to ``out``. Its peak memory is then the toolkit's alone.

    ``whole``: the whole command as an operator runs it (preflight, the fingerprint of what
    the milestone can change, the batched apply, the closing verify), each part timed;
    otherwise without the closing verify (the set-based baseline, whose apply is timed)."""
    engine = create_engine(sa.make_url(url))
    started = time.perf_counter()
    result = Runner(
        engine, RunOptions(**json.loads(options)), plan=registry.plan(), command="scripts/bench.py"
    ).migrate(registry.get(milestone), verify_after=whole == "whole")
    seconds = time.perf_counter() - started
    engine.dispose()
    phases = {name: round(took, 3) for name, took in result.timings.items()}
    phases["preflight"] = round(seconds - sum(result.timings.values()), 3)
    Path(out).write_text(json.dumps({
        "seconds": seconds, "rows": result.rows, "phases": phases,
        # the closing verify, taken while the writer still logs runs: milestones 1 and 3 then
        # find its newest rows not yet migrated (an operator runs migrate again, as below)
        "verified": result.verify.ok if result.verify else None,
        "wal_bytes": sum(p.wal_bytes for p in result.passes),
        "timeline": [[p.name, round(s, 4), n] for p in result.passes
                     for s, n in zip(p.batch_seconds, p.batch_sizes, strict=True)]}))


_labels = itertools.count()


@contextmanager
def _training(url: sa.URL, clients: int) -> Iterator[dict[str, Any] | None]:
    """``clients`` training clients writing through ``toolkit mlflow serve --allow-writes``
    on ``url`` while the body runs (they start, and each ends a run, before it); the dict
    yielded is filled when the block ends: the write latencies of the calls the clients
    started meanwhile, the 503s they retried, and what did not read back."""
    if not clients:
        yield None
        return
    with tempfile.TemporaryDirectory() as folder, \
            writing_server(_text(url), Path(folder) / "serve.stderr", "--no-access-log") as server:
        if server.address is None:
            raise SystemExit(f"--mlflow-clients: the server would not start with writes: {server.problem}")
        engine = create_engine(url)
        with engine.connect() as conn:
            # not the first project, where the application-like writer makes its experiments: the
            # clients' names and runs stay apart from its own
            projects = list(conn.execute(sa.text("SELECT id FROM projects ORDER BY id OFFSET 1 LIMIT :n"),
                                         {"n": clients}).scalars())
        engine.dispose()
        workload = Workload(server.address, projects, clients=clients, seed=1,
                            folder=Path(folder) / "journals", label=f"b{next(_labels)}", pause_s=0.05)
        result: dict[str, Any] = {"clients": clients}
        with workload:
            if problem := first_runs(workload):
                raise SystemExit(f"--mlflow-clients: {problem}")
            began = time.time()
            yield result
            ended = time.time()
        report = read_back(server.address, workload.journals)
        during = [ms / 1000 for t, ms in write_latencies(list(read_journals(workload.journals)))
                  if began <= t <= ended]  # (the journals go with the folder)
    result.update({"writes": len(during), "write_p50_ms": as_ms(percentile(during, 50)),
                   "write_p99_ms": as_ms(percentile(during, 99)),
                   "write_max_ms": as_ms(max(during, default=0)),
                   "retried_503": report.retried_503, "other_5xx": dict(report.other_5xx),
                   "not_acknowledged": report.not_acknowledged, "errors": dict(report.errors),
                   "lost": len(report.lost), "duplicated": len(report.duplicated),
                   "read_back": report.summary()})


BENCH_COMMAND = str(Path(__file__).with_name("bench_command.py"))


def _cli_options(options: RunOptions) -> list[str]:
    """``options`` as the command line's flags: the whole command is run as typed."""
    flags = ["--batch-size", str(options.batch_size),
             "--statement-timeout-ms", str(options.statement_timeout_ms)]
    if options.target_batch_ms is not None:
        flags += ["--target-batch-ms", str(options.target_batch_ms)]
    return flags


def _with_writer(url: sa.URL, milestone: str, mlflow_clients: int, body: Any) -> tuple[Any, dict, Any]:
    """``body()`` while GitLab as deployed for the milestone logs a run (and an experiment)
    every 20 ms, and the training clients write if asked; (its result, the writer's
    latencies, the clients')."""
    with _training(url, mlflow_clients) as mlflow:
        writer = AppWriter.during(url, milestone, interval_s=0.02, experiment_every=1)
        writer.start()
        try:
            result = body()
        finally:
            traffic = writer.finish()
    return result, traffic, mlflow


def _timed_migrate(url: sa.URL, milestone: str, options: RunOptions, whole: bool,
                   mlflow_clients: int = 0) -> dict[str, Any]:
    """``whole``: the command ``toolkit --json migrate MILESTONE --yes`` as an operator types
    it (scripts/bench_command.py), timed from the parent: process start to exit; its parts
    from the run's own timings, and ``process`` the rest (interpreter, imports, connecting,
    the --json document, exit). Otherwise the set-based baseline: the run in a worker
    process, its apply timed."""
    def body() -> tuple[Command, dict[str, Any]]:
        with tempfile.NamedTemporaryFile("r") as out:
            if whole:
                argv = [BENCH_COMMAND, out.name, "--database-url", _text(url), "--json", "migrate",
                        milestone, "--yes", *_cli_options(options)]
            else:
                argv = [__file__, "--migrate-worker", _text(url), milestone,
                        json.dumps(options.as_dict()), out.name, "apply"]
            worker = _measured(argv)
            return worker, json.loads(out.read())

    (worker, run), traffic, mlflow = _with_writer(url, milestone, mlflow_clients, body)
    if "timeline" not in run:
        raise SystemExit(f"toolkit migrate {milestone} did not run (exit {run.get('exit_code')})")
    timeline, phases = run["timeline"], run["phases"]
    if whole:
        seconds = worker.seconds
        # the command's own checks before the run (its state, connecting) count as preflight;
        # the rest of the process around the run (interpreter, imports, the report, exit) not
        phases["preflight"] = round(phases["preflight"] + run["cli_before_run"], 3)
        phases["process"] = round(worker.seconds - run["runner_seconds"] - run["cli_before_run"], 3)
        phases["cli_before_run"], phases["cli_after_run"] = run["cli_before_run"], run["cli_after_run"]
    else:  # the bare change: its apply alone
        seconds = phases.get("apply", run["seconds"])
    batches = [s for _, s, _ in timeline]
    sizes = [n for _, _, n in timeline]
    return {"seconds": round(seconds, 3), "apply_seconds": phases.get("apply"), "phases": phases,
            "verified": run["verified"], "rows": run["rows"], "peak_mb": worker.peak_mb,
            "rows_per_second": round(run["rows"] / seconds) if seconds else None,
            "batches": len(batches),
            "batch_p50_ms": as_ms(percentile(batches, 50)), "batch_p99_ms": as_ms(percentile(batches, 99)),
            "batch_max_ms": as_ms(max(batches, default=0)),
            "batch_size_min": min(sizes, default=0), "batch_size_max": max(sizes, default=0),
            # WAL the batches wrote (LSN deltas read in each batch's checkpoint statement)
            "wal_bytes": run.get("wal_bytes"),
            "wal_bytes_per_row": (round(run["wal_bytes"] / run["rows"])
                                  if run.get("wal_bytes") is not None and run["rows"] else None),
            "timeline": timeline, "writer": traffic, "mlflow": mlflow}


def _timed_hand(url: sa.URL, milestone: str, form: str, mlflow_clients: int = 0) -> dict[str, Any]:
    """One hand-written form (scripts/bench_hand.py), its statements in one psql-like
    session of this process, the writer running as for the toolkit's runs."""
    done, traffic, mlflow = _with_writer(url, milestone, mlflow_clients,
                                         lambda: bench_hand.run(url, milestone, form))
    return {**done, "writer": traffic, "mlflow": mlflow}


def _median(each: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(each, key=lambda run: run["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "seconds_each": [run["seconds"] for run in each]}


def hand_forms(milestone: str, chosen: tuple[str, ...]) -> tuple[str, ...]:
    """The hand forms run for ``milestone``: those of ``chosen`` that differ from another
    (milestone 1's bare form is its online form; 2 and 4 have no ledger of rows)."""
    skip = {"milestone-1": {"bare"}, "milestone-2": {"ledgered"}, "milestone-4": {"ledgered"}}
    return tuple(form for form in chosen if form not in skip.get(milestone, set()))


def compare(admin: sa.Engine, url: sa.URL, milestone: str, repeat: int,
            options: dict[str, RunOptions], mlflow_clients: int = 0,
            forms: tuple[str, ...] = bench_hand.FORMS) -> dict[str, dict[str, Any]]:
    """The set-based baseline, the whole command and each hand-written form, ``repeat``
    times each; the median run of each (by seconds), with every run's seconds in
    ``seconds_each``.

    Every run gets a fresh copy of the same settled database, made the same way just
    before: a copy starts with its pages in shared buffers, so a run on the original would
    meet a colder cache than one on a copy. The order rotates and reverses from one round
    to the next, so that no kind always follows the same other. One run of a 2-core virtual
    machine's disk varies by a tenth either way; a single pair cannot tell 0.8 from 0.9. The
    last batched copy, ``bench_batched``, is left for the next milestone to start from.

    In the first round, each hand form's copy is then compared with the toolkit's on the
    rows the milestone changes among those that existed before (bench_hand.changed_rows):
    ``same_rows`` says whether the hand-written change was the toolkit's.
    """
    kinds = ["set_based", "batched", *hand_forms(milestone, forms)]
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    engine = create_engine(url)
    with engine.connect() as conn:
        marks = bench_hand.watermarks(conn)
    engine.dispose()
    digests: dict[str, dict[str, str]] = {}
    copy_seconds = 0.0
    for i in range(repeat):
        order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
        for kind in order if i % 2 == 0 else order[::-1]:
            print(f"{milestone}: {kind.replace('_', '-')} run {i + 1} of {repeat} ...", flush=True)
            database = "bench_batched" if kind == "batched" else f"bench_{kind}"
            copying = time.perf_counter()
            copy = _fresh_copy(admin, url, database)
            copy_seconds += time.perf_counter() - copying
            if kind in ("set_based", "batched"):
                runs[kind].append(_timed_migrate(copy, milestone, options[kind], whole=kind == "batched",
                                                 mlflow_clients=mlflow_clients))
            else:
                runs[kind].append(_timed_hand(copy, milestone, kind, mlflow_clients))
            if i == 0 and kind != "set_based":
                engine = create_engine(copy)
                with engine.connect() as conn:
                    digests[kind] = bench_hand.changed_rows(conn, milestone, marks)
                engine.dispose()
            if kind != "batched":
                _drop(admin, database)
    # What the writer added at the very end is taken by a second run, as an operator would
    # (not timed): the next milestone's gate needs this one to verify.
    engine = create_engine(url.set(database="bench_batched"))
    try:
        Runner(engine, options["batched"], plan=registry.plan()).migrate(registry.get(milestone))
    except PreconditionRefused as refused:  # said, and the table says the milestone did not verify
        print(f"{milestone}: the catch-up run was refused: {refused}", flush=True)
    engine.dispose()
    medians = {kind: _median(each) for kind, each in runs.items()}
    print(f"{milestone}: {len(kinds) * repeat} copies took {copy_seconds:.0f} s", flush=True)
    medians["batched"]["copies_seconds"] = round(copy_seconds, 1)
    for kind in kinds[2:]:
        toolkit_rows = digests["batched"]
        differ = sorted(part for part in toolkit_rows if digests[kind].get(part) != toolkit_rows[part])
        medians[kind]["same_rows"] = not differ
        medians[kind]["differing"] = differ
        if differ:
            print(f"{milestone}: the {kind} form left other rows than the toolkit: {differ}", flush=True)
    if "online" in medians and "bare" in forms and "bare" not in medians:
        medians["bare"] = {**medians["online"], "same_statement_as": "online"}
    return medians


METRIC_TEMPLATES = {10: "bench_metrics_10", 1: "bench_metrics_1"}


def seed_metric_templates(args: argparse.Namespace, admin: sa.Engine, url: sa.URL) -> int:
    """Before the milestones: the same data with 1 metric row per candidate, kept aside as
    ``bench_metrics_1``, then (after the scale's own seed, by the caller) a pristine copy of
    that as ``bench_metrics_10``. Returns the metric rows of the 1-per-candidate data."""
    print("seeding the same data with 1 metric per candidate ...", flush=True)
    one = _toolkit("sandbox", "--data-dir", str(args.data_dir.resolve()), "seed", "--scale", args.scale,
                   "--seed", str(args.seed), "--metrics-per-candidate", "1")
    _drop(admin, METRIC_TEMPLATES[1])
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{url.database}" RENAME TO "{METRIC_TEMPLATES[1]}"'))
    _settle(url.set(database=METRIC_TEMPLATES[1]))
    return one.doc["result"]["counts"]["ml_candidate_metrics"]


def metrics_variant(args: argparse.Namespace, admin: sa.Engine, url: sa.URL, options: RunOptions,
                    results: dict[str, Any], one_metric_rows: int) -> dict[str, Any]:
    """Milestone 1's whole command on the same data with the scale's 10 metric rows per
    candidate and with 1: it never writes a metric, so its proof must not read them, and
    the two must be within a tenth of each other.

    Timed as above (a fresh copy each time, the writer running), alternating 10 and 1 on
    copies of the two pristine seeds, ``--repeat`` times each, the medians compared: one
    after the other, minutes apart, the drift of a shared machine would be measured too."""
    per_candidate = round(SCALES[args.scale].metrics_per_candidate)
    runs: dict[int, list[dict[str, Any]]] = {10: [], 1: []}
    for i in range(args.repeat):
        for metrics in (10, 1) if i % 2 == 0 else (1, 10):
            print(f"milestone-1 at {metrics} metric(s) per candidate: run {i + 1} of {args.repeat} ...",
                  flush=True)
            copy = _fresh_copy(admin, url.set(database=METRIC_TEMPLATES[metrics]), "bench_metrics")
            runs[metrics].append(_timed_migrate(copy, "milestone-1", options, whole=True))
    for database in ("bench_metrics", *METRIC_TEMPLATES.values()):
        _drop(admin, database)
    median = {n: sorted(each, key=lambda run: run["seconds"])[(len(each) - 1) // 2]
              for n, each in runs.items()}
    variant = {
        "metrics_per_candidate": [per_candidate, 1],
        "metric_rows": [results["counts"]["ml_candidate_metrics"], one_metric_rows],
        "seconds": [median[10]["seconds"], median[1]["seconds"]],
        "seconds_each": [[run["seconds"] for run in runs[n]] for n in (10, 1)],
        "phases": [median[10]["phases"], median[1]["phases"]],
        "ratio": round(median[10]["seconds"] / median[1]["seconds"], 3),
    }
    print(json.dumps({"metrics_variant": variant}), flush=True)
    return variant


def _settle(url: sa.URL, vacuum: bool = True) -> float:
    """Start a timed run from a quiet server: vacuumed, statistics fresh, no dirty buffers
    of an earlier run left for the checkpointer to write in the middle of this one."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    with engine.connect() as conn:
        if vacuum:
            conn.execute(sa.text("VACUUM (ANALYZE)"))
        conn.execute(sa.text("CHECKPOINT"))
    engine.dispose()
    return round(time.perf_counter() - started, 3)


@dataclass
class Command:
    seconds: float
    peak_mb: float
    exit_code: int
    doc: dict[str, Any]  # the --json document


# Runs the toolkit's command line (or this script, for --migrate-worker) and, as it exits,
# writes the process's peak resident memory. VmHWM, not getrusage: on Linux a child's
# ru_maxrss keeps the peak of the process it was forked from, here the benchmark's own.
PEAK_MEMORY_LAUNCHER = """
import atexit, re, runpy, sys
def _peak(path=sys.argv.pop(1)):
    status = open('/proc/self/status').read()
    open(path, 'w').write(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))
atexit.register(_peak)
if sys.argv[1].endswith('.py'):
    sys.argv.pop(0)
    runpy.run_path(sys.argv[0], run_name='__main__')
else:
    from toolkit.cli.main import main
    sys.argv[0] = 'toolkit'
    main()
"""


def _measured(argv: list[str]) -> Command:
    """Run ``argv`` under the launcher; its time, peak memory, exit code and stdout (JSON)."""
    with tempfile.TemporaryFile() as stdout, tempfile.NamedTemporaryFile("r") as peak:
        started = time.perf_counter()
        process = subprocess.run([sys.executable, "-c", PEAK_MEMORY_LAUNCHER, peak.name, *argv],
                                 stdout=stdout)
        seconds = time.perf_counter() - started
        peak_kb = int(peak.read() or 0)
        stdout.seek(0)
        output = stdout.read()
    if argv[0].endswith(".py") and process.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed ({process.returncode})")
    doc = json.loads(output) if output.strip().startswith(b"{") else {}
    return Command(round(seconds, 3), round(peak_kb / 1024, 1), process.returncode, doc)


def _toolkit(*args: str) -> Command:
    """Run ``toolkit --json ARGS`` as an operator would; time it and read its peak memory."""
    command = _measured(["--json", *args])
    if command.exit_code not in (ExitCode.OK, ExitCode.VERIFY_FAILED):  # a failed verify is reported
        shown = args[2:] if args[0] == "--database-url" else args
        raise SystemExit(f"toolkit {' '.join(shown)} failed ({command.exit_code}): "
                         f"{command.doc.get('error')}")
    return command


def _text(url: sa.URL) -> str:
    return url.render_as_string(hide_password=False)


def _fresh_copy(admin: sa.Engine, url: sa.URL, target: str) -> sa.URL:
    """A copy of ``url``'s database, then a checkpoint so the copy's writes are done."""
    _drop(admin, target)
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": url.database})
        conn.execute(sa.text(f'CREATE DATABASE "{target}" TEMPLATE "{url.database}"'))
        conn.execute(sa.text("CHECKPOINT"))
    return url.set(database=target)


def _drop(admin: sa.Engine, database: str) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


def process_start(times: int = 5) -> float:
    """``toolkit --version`` through the same launcher as the whole command, median of
    ``times``: the interpreter starting, importing the command line, exiting. Shown beside
    the whole command's ``process`` part (which adds connecting and the --json document)."""
    return sorted(_measured(["--version"]).seconds for _ in range(times))[times // 2]


# The parts of the gap between the change typed bare and the whole command, in the order
# they add up: each is one measured variant minus the one before, so they sum to the
# whole command's median run exactly (a part can come out below zero by noise).
BREAKDOWN = (
    ("bare", "by hand, bare"),
    ("online_ddl", "online DDL"),
    ("guards", "anomaly guards"),
    ("ledger", "undo ledger"),
    ("passes", "toolkit passes, one batch each"),
    ("batching", "batching"),
    ("proof", "proof (preflight, fingerprint, verify)"),
    ("process", "process start and exit"),
)


def breakdown(batched: dict[str, Any], baseline: dict[str, Any], hand: dict[str, Any],
              process_reference: float) -> dict[str, Any]:
    """Where the whole command's time goes, from the medians of this milestone's variants:

    * bare: the change typed on a quiet database;
    * online DDL: the online form less the bare one (CONCURRENTLY, NOT VALID + VALIDATE, the
      transition triggers, milestone 4's archive copy);
    * anomaly guards: the guarded form less the online one;
    * undo ledger: the guarded form writing the toolkit's ledgers, less the guarded form;
    * toolkit passes: the set-based baseline's apply (the toolkit's own passes and schema
      steps, each one batch: Alembic revisions, lock_timeout retries, lease fence,
      checkpoint, write record) less the ledgered form;
    * batching: the batched apply less the set-based one (per-batch round trips,
      checkpoints, fences, write records, the keyset walk);
    * proof: the run's preflight, fingerprint and closing verify;
    * process: the command's wall time less its run (interpreter, imports, connecting, the
      --json document, exit); ``toolkit --version`` alone is ``process_start_reference``.
    """
    if not all(form in hand for form in ("bare", "online", "guarded")):
        return {}
    phases = batched["phases"]
    ledgered = hand.get("ledgered", hand["guarded"])["seconds"]
    apply = phases.get("apply") or 0.0
    parts = {
        "bare": hand["bare"]["seconds"],
        "online_ddl": hand["online"]["seconds"] - hand["bare"]["seconds"],
        "guards": hand["guarded"]["seconds"] - hand["online"]["seconds"],
        "ledger": ledgered - hand["guarded"]["seconds"],
        "passes": baseline["seconds"] - ledgered,
        "batching": apply - baseline["seconds"],
        "proof": sum(phases.get(p) or 0.0 for p in ("preflight", "fingerprint", "verify")),
        "process": phases.get("process") or 0.0,
    }
    found: dict[str, Any] = {name: round(value, 3) for name, value in parts.items()}
    found["whole"] = batched["seconds"]
    found["process_start_reference"] = process_reference
    found["ledger_measured"] = "ledgered" in hand
    return found


SAFEGUARD_TRANSACTIONS = 2000


def safeguard_cost(url: sa.URL) -> dict[str, float]:
    """What every transaction of a run pays for running safely in production, per
    transaction, against the same transaction without it, measured here in one run.

    * ``plain``: a bare SQLAlchemy engine, one ``SELECT 1`` and a commit;
    * ``timeouts``: the toolkit's engine, whose ``begin`` hook sets the transaction's own
      ``lock_timeout`` and ``statement_timeout`` (one more round trip);
    * ``fenced``: that and the lease check at commit (the lease row FOR SHARE and the lock
      holder in ``pg_locks``), as every commit of a run has.
    The three alternate in blocks so drift on a shared machine lands on all of them.
    """
    from toolkit.engine.lease import Hold
    from toolkit.schema.migrations import ensure_own_tables

    plain, toolkit_engine = sa.create_engine(url), create_engine(url)
    with toolkit_engine.connect() as conn:
        ensure_own_tables(conn)
    hold = Hold(create_engine(url), "scripts/bench.py safeguard cost", wait_s=30).__enter__()
    timings: dict[str, list[float]] = {"plain": [], "timeouts": [], "fenced": []}
    try:
        def run(engine: sa.Engine, kind: str, n: int) -> None:
            with engine.connect() as conn:
                for _ in range(n):
                    began = time.perf_counter()
                    conn.execute(sa.text("SELECT 1"))
                    conn.commit()
                    timings[kind].append(time.perf_counter() - began)

        with hold.engine.connect() as conn:
            hold.claim(conn)
        block = 100
        for _ in range(SAFEGUARD_TRANSACTIONS // block):
            run(plain, "plain", block)
            run(toolkit_engine, "timeouts", block)
            run(hold.engine, "fenced", block)
    finally:
        hold.__exit__(None, None, None)
        for engine in (plain, toolkit_engine, hold.engine):
            engine.dispose()
    found = {f"{kind}_ms": round(percentile(values, 50) * 1000, 3) for kind, values in timings.items()}
    found["overhead_ms"] = round(found["fenced_ms"] - found["plain_ms"], 3)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="gitlab-com", choices=["small", "gitlab-com", "x25"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="fix every batch at this size (default: adaptive, as migrate does)")
    parser.add_argument("--target-batch-ms", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of each kind per milestone; the median counts (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hand-forms", nargs="*", default=list(bench_hand.FORMS), choices=bench_hand.FORMS,
                        metavar="FORM", help="the hand-written forms to time against the whole command "
                        f"(default: all of {', '.join(bench_hand.FORMS)}; none: only the set-based baseline)")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-results/sandbox"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--chart", type=Path, metavar="RESULT_JSON",
                        help="only draw the chart of an earlier result (next to it, as .png)")
    parser.add_argument("--replica-lag", action="store_true",
                        help="instead: with a streaming replica attached, each milestone's largest "
                             "replica lag with throttling off and on")
    parser.add_argument("--mlflow-clients", type=int, default=0, metavar="N",
                        help="N training clients (the real MLflow client) write through `toolkit mlflow "
                             "serve --allow-writes` during every timed run; their write p50/p99 is reported")
    parser.add_argument("--costs-only", action="store_true",
                        help="measure only what each transaction and each batch pays for running "
                             "safely and being watched (events, metrics, control, live progress), "
                             "print it and stop")
    parser.add_argument("--migrate-worker", nargs=5, metavar=("URL", "MILESTONE", "OPTIONS", "OUT", "WHOLE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.migrate_worker:
        migrate_worker(*args.migrate_worker)
        return
    if args.chart:
        chart(json.loads(args.chart.read_text()), args.chart.with_suffix(".png"))
        return
    if args.replica_lag:
        replica_lag(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_dir.parent.mkdir(parents=True, exist_ok=True)
    bench_started = time.perf_counter()
    load_before = os.getloadavg()[1]

    server = SandboxServer(args.data_dir.resolve())
    status = server.start()
    admin = create_engine(status.url("postgres"), isolation_level="AUTOCOMMIT")
    one_metric_rows = seed_metric_templates(args, admin, sa.make_url(status.url()))
    print(f"seeding {args.scale} ...", flush=True)
    seeded = _toolkit("sandbox", "--data-dir", str(args.data_dir.resolve()), "seed", "--scale", args.scale,
                      "--seed", str(args.seed))
    status = server.status()
    url = sa.make_url(status.url())
    target = batch_target(args.batch_size, args.target_batch_ms)
    batched_options = RunOptions(batch_size=args.batch_size or RunOptions.batch_size,
                                 target_batch_ms=target, statement_timeout_ms=600_000)
    results: dict[str, Any] = {
        "scale": args.scale, "batch_size": args.batch_size, "target_batch_ms": target,
        "repeat": args.repeat, "mlflow_clients": args.mlflow_clients,
        "seed_seconds": seeded.doc["result"]["seconds"], "seed_peak_mb": seeded.peak_mb,
        "counts": seeded.doc["result"]["counts"], "milestones": {}}
    results["vacuum_after_seed_seconds"] = _settle(url)
    _fresh_copy(admin, url, METRIC_TEMPLATES[10])  # the pristine seed, for the metrics variant
    results["safeguards_per_transaction"] = safeguard_cost(url)
    print(json.dumps({"safeguards_per_transaction": results["safeguards_per_transaction"]}), flush=True)
    observed = _fresh_copy(admin, url, "bench_observe")
    results["observe_per_batch"] = bench_observe.observe_cost(observed)
    _drop(admin, observed.database)
    print(json.dumps({"observe_per_batch": results["observe_per_batch"]}), flush=True)
    if args.costs_only:
        admin.dispose()
        server.stop()
        return
    results["process_start_seconds"] = process_start()
    # The operator's first command: every milestone's plan on the untouched database.
    first_plan = _toolkit("--database-url", _text(url), "plan", "--no-sql")
    results["plan_all"] = {"seconds": first_plan.seconds, "peak_mb": first_plan.peak_mb}
    try:
        for milestone in registry.MILESTONES:
            planned = _toolkit("--database-url", _text(url), "plan", milestone, "--no-sql")

            # Each run takes its own fingerprint of what the milestone can change, timed as
            # a part of the whole command.

            _settle(url)
            medians = compare(admin, url, milestone, args.repeat, {
                "set_based": RunOptions(batch_size=10**12, statement_timeout_ms=3_600_000),
                "batched": batched_options}, args.mlflow_clients, tuple(args.hand_forms))
            baseline, batched = medians["set_based"], medians["batched"]
            hand = {form: medians[form] for form in bench_hand.FORMS if form in medians}
            _drop(admin, url.database)
            with admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "bench_batched" RENAME TO "{url.database}"'))
            verified = _toolkit("--database-url", _text(url), "verify", milestone)
            if verified.exit_code != ExitCode.OK:
                problem = verified.doc.get("error", {}).get("problem")
                print(f"{milestone}: verify failed: {problem}", flush=True)
            results["milestones"][milestone] = {
                "plan_seconds": planned.seconds, "plan_peak_mb": planned.peak_mb,
                "verify_seconds": verified.seconds, "verify_peak_mb": verified.peak_mb,
                "fingerprint_seconds": batched["phases"].get("fingerprint"),
                "verified": verified.exit_code == ExitCode.OK,
                "batched": batched, "set_based": baseline, "hand": hand,
                # the batched apply alone, and the whole command, against the bare change
                "throughput_ratio": (round(baseline["seconds"] / batched["apply_seconds"], 3)
                                     if batched["apply_seconds"] else None),
                "whole_command_ratio": (round(baseline["seconds"] / batched["seconds"], 3)
                                        if batched["seconds"] else None),
                # the whole command against the change typed by hand (hand seconds / whole)
                **{f"ratio_{form}": round(run["seconds"] / batched["seconds"], 3)
                   for form, run in hand.items()},
                "breakdown": breakdown(batched, baseline, hand, results["process_start_seconds"]),
            }
            shown = {k: v for k, v in results["milestones"][milestone].items()
                     if k not in ("batched", "set_based", "hand")}
            shown["wal_bytes_per_row"] = batched.get("wal_bytes_per_row")
            shown["observe_share_of_p50_batch_pct"] = bench_observe.share_of(
                results["observe_per_batch"], batched.get("batch_p50_ms"))
            if batched.get("mlflow"):
                shown["mlflow_batched"] = {k: v for k, v in batched["mlflow"].items() if k != "read_back"}
            print(json.dumps(shown), flush=True)
        results["metrics_variant"] = metrics_variant(args, admin, url, batched_options, results,
                                                     one_metric_rows)
    finally:
        admin.dispose()
        server.stop()
    # The benchmark's own process: the writer's threads, fingerprints, the untimed re-runs.
    results["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    commands = [m[f"{c}_peak_mb"] for m in results["milestones"].values() for c in ("plan", "verify")]
    commands += [m["batched"]["peak_mb"] for m in results["milestones"].values()]
    commands.append(results["plan_all"]["peak_mb"])
    results["command_peak_mb"] = max(commands, default=None)
    results["bench_seconds"] = round(time.perf_counter() - bench_started)
    # how busy the machine was (5-minute load average, start and end): a shared machine's
    # other work lands in every run, unevenly
    results["load_average"] = [round(load_before, 1), round(os.getloadavg()[1], 1), os.cpu_count()]
    (args.out / f"{args.scale}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{args.scale}.md").write_text(markdown(results))
    print(markdown(results))
    chart(results, args.out / f"{args.scale}.png")


def chart(results: dict[str, Any], path: Path) -> None:
    """Each batch's duration against the time the batched apply had run, one panel per
    milestone, one colour per pass: a budget that holds shows as a flat band."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: install the bench extra (pip install -e '.[bench]') for matplotlib")
        return
    milestones = results["milestones"]
    broken = {name: m["breakdown"] for name, m in milestones.items() if m.get("breakdown")}
    panels = len(milestones) + (1 if broken else 0)
    figure, axes = plt.subplots(panels, 1, figsize=(10, 2.6 * panels), squeeze=False)
    if broken:
        _breakdown_panel(axes[-1, 0], broken)
    for ax, (name, m) in zip(axes[:, 0], milestones.items(), strict=False):
        elapsed, by_pass = 0.0, {}
        for pass_name, seconds, _keys in m["batched"]["timeline"]:
            elapsed += seconds
            by_pass.setdefault(pass_name, ([], []))
            by_pass[pass_name][0].append(elapsed)
            by_pass[pass_name][1].append(seconds * 1000)
        for pass_name, (xs, ys) in by_pass.items():
            ax.plot(xs, ys, marker=".", linestyle="-", linewidth=0.6, label=pass_name)
        if results.get("target_batch_ms"):
            ax.axhline(results["target_batch_ms"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{name}: {m['batched']['batches']} batches, ratio {m['throughput_ratio']}",
                     fontsize=9)
        ax.set_ylabel("batch ms")
        ax.legend(fontsize=7, loc="upper right")
    axes[len(milestones) - 1, 0].set_xlabel("seconds of batches")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"chart: {path}")


def _breakdown_panel(ax: Any, broken: dict[str, dict[str, Any]]) -> None:
    """One stacked bar per milestone: where the whole command's time goes (parts below zero,
    noise, are drawn as nothing), the whole command marked above it."""
    names = list(broken)
    bottoms = [0.0] * len(names)
    for key, label in BREAKDOWN:
        values = [max(broken[n].get(key) or 0.0, 0.0) for n in names]
        ax.bar(names, values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.scatter(names, [broken[n]["whole"] for n in names], marker="_", s=400, color="black",
               label="whole command (median)", zorder=3)
    ax.set_ylabel("seconds")
    ax.set_title("where the whole command's time goes", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", ncol=2)


def _spread(run: dict[str, Any]) -> str:
    each = run.get("seconds_each", [])
    return f"{run['seconds']} ({min(each)}-{max(each)})" if len(each) > 1 else str(run["seconds"])


def _safeguard_lines(results: dict[str, Any]) -> list[str]:
    cost = results.get("safeguards_per_transaction")
    if not cost:
        return []
    return [f"Each transaction's own timeouts and lease check (median of {SAFEGUARD_TRANSACTIONS} "
            f"empty transactions each): {cost['plain_ms']} ms bare, {cost['timeouts_ms']} ms with its "
            f"timeouts, {cost['fenced_ms']} ms fenced too: {cost['overhead_ms']} ms a commit.", ""]


def _hand_lines(results: dict[str, Any]) -> list[str]:
    """The whole command against the change typed by hand, and where its time goes."""
    with_hand = {name: m for name, m in results["milestones"].items() if m.get("hand")}
    if not with_hand:
        return []
    lines = ["", "Against the change written by hand (scripts/bench_hand.py), each form run as often as "
             "the whole command, alternating, on fresh copies, the writer running; the whole command is "
             "`toolkit --json migrate MILESTONE --yes` from process start to exit. Ratio = hand-written "
             "seconds / whole-command seconds (1.0: as fast as typing it by hand). Same rows: after the "
             "form, the rows the milestone changes (of those there before) are the toolkit's.", "",
             "| milestone | by hand, bare s | by hand, online s | by hand, guarded s | guarded + ledger s "
             "| whole command s | ratio online | ratio guarded | writer p99 ms whole/online | same rows |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in with_hand.items():
        h = m["hand"]

        def shown(form: str, h: dict[str, Any] = h) -> str:
            if form not in h:
                return "-"
            same_as = h[form].get("same_statement_as")
            return _spread(h[form]) + (f" (= {same_as})" if same_as else "")

        same = all(run.get("same_rows", True) for run in h.values())
        differing = sorted({part for run in h.values() for part in run.get("differing", [])})
        online_p99 = h.get("online", {}).get("writer", {}).get("p99_ms")
        forms = " | ".join(shown(form) for form in ("bare", "online", "guarded", "ledgered"))
        lines.append(f"| {name} | {forms} "
                     f"| {_spread(m['batched'])} | {m.get('ratio_online', '-')} "
                     f"| {m.get('ratio_guarded', '-')} "
                     f"| {m['batched']['writer']['p99_ms']}/{online_p99} "
                     f"| {'yes' if same else 'NO: ' + ', '.join(differing)} |")
    lines += ["", "Where the whole command's time goes (seconds, from the medians above; each part is one "
              "measured variant less the one before, so they add up to the whole command; below zero is "
              "noise). `toolkit --version` alone: "
              f"{results.get('process_start_seconds')} s.", "",
              "| milestone | " + " | ".join(label for _, label in BREAKDOWN) + " | whole |",
              "|---|" + "---|" * (len(BREAKDOWN) + 1)]
    for name, m in with_hand.items():
        b = m.get("breakdown") or {}
        if b:
            ledger = "" if b.get("ledger_measured") else " (none)"
            cells = [f"{b[key]}{ledger if key == 'ledger' else ''}" for key, _ in BREAKDOWN]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {b['whole']} |")
    return lines


def _mlflow_lines(results: dict[str, Any]) -> list[str]:
    """With --mlflow-clients: each milestone's write latency through the server, batched and
    set-based, and milestone 3's ratio with the workload running."""
    if not results.get("mlflow_clients"):
        return []
    lines = ["", f"{results['mlflow_clients']} training clients (the real MLflow client, "
             "`toolkit/sandbox/training.py`) wrote through `toolkit mlflow serve --allow-writes` during "
             "every timed run; latencies are per client call, measured in the clients, of the calls "
             "started while the migrate ran (median run of each kind):", "",
             "| milestone | writes batched | write p50/p99/max ms batched | write p50/p99/max ms set-based "
             "| 503s retried batched/set-based | read back (batched) | ratio apply |",
             "|---|---|---|---|---|---|---|"]
    for name, m in results["milestones"].items():
        b, s = m["batched"].get("mlflow") or {}, m["set_based"].get("mlflow") or {}
        back = "all" if not b.get("lost") and not b.get("duplicated") else \
            f"{b.get('lost')} lost, {b.get('duplicated')} duplicated"
        lines.append(f"| {name} | {b.get('writes')} | {b.get('write_p50_ms')}/{b.get('write_p99_ms')}/"
                     f"{b.get('write_max_ms')} | {s.get('write_p50_ms')}/{s.get('write_p99_ms')}/"
                     f"{s.get('write_max_ms')} | {b.get('retried_503')}/{s.get('retried_503')} | {back} "
                     f"| {m['throughput_ratio']} |")
    if "milestone-3" in results["milestones"]:
        lines += ["", f"Milestone 3's ratio with the workload running: "
                  f"{results['milestones']['milestone-3']['throughput_ratio']} (apply), "
                  f"{results['milestones']['milestone-3']['whole_command_ratio']} (whole command)."]
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Scale {results['scale']}, "
        + (f"batch size {results['batch_size']} fixed, " if not results.get("target_batch_ms") else
           f"batches sized toward {results['target_batch_ms']} ms, ")
        + f"seeded in {results['seed_seconds']:.1f} s; `toolkit plan` of all four on it "
        f"{results['plan_all']['seconds']} s. Peak memory of the toolkit (each plan, batched "
        f"apply and verify its own process): {results.get('command_peak_mb')} MB. "
        f"Batched and set-based each ran {results.get('repeat', 1)} times, alternating, on fresh "
        "copies; the median run of each is shown, with the fastest and slowest in brackets."
        + (f" The benchmark ran {results['bench_seconds'] / 60:.0f} minutes in all."
           if results.get("bench_seconds") else "")
        + (" Load average (5 min) {} at the start, {} at the end, on {} cores.".format(
            *results["load_average"]) if results.get("load_average") else ""),
        "",
        *_safeguard_lines(results),
        "| milestone | rows | whole `migrate` s | its preflight/fingerprint/apply/verify/process s "
        "| set-based s "
        "| ratio apply | ratio whole | batches (keys each) | batch p50/p99/max ms "
        "| writer p99 ms batched | writer p99 ms set-based | plan s | verify s "
        "| MB apply/verify |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["milestones"].items():
        b, s = m["batched"], m["set_based"]
        parts = "/".join(str(b["phases"].get(part, "-"))
                         for part in ("preflight", "fingerprint", "apply", "verify", "process"))
        lines.append(
            f"| {name} | {b['rows']} | {_spread(b)} | {parts} | {_spread(s)} | {m['throughput_ratio']} | "
            f"{m['whole_command_ratio']} | "
            f"{b['batches']} ({b.get('batch_size_min')}-{b.get('batch_size_max')}) | "
            f"{b['batch_p50_ms']}/{b['batch_p99_ms']}/{b['batch_max_ms']} | "
            f"{b['writer']['p99_ms']} | {s['writer']['p99_ms']} | {m['plan_seconds']} | "
            f"{m['verify_seconds']}{'' if m['verified'] else ' (FAILED)'} | "
            f"{b.get('peak_mb')}/{m['verify_peak_mb']} |")
    lines += ["", *bench_observe.lines(results)]
    lines += _hand_lines(results)
    lines += _mlflow_lines(results)
    variant = results.get("metrics_variant")
    if variant:
        (ten, one), (rows_ten, rows_one) = variant["seconds"], variant["metric_rows"]
        lines += ["", f"`migrate milestone-1`, the whole command, with {variant['metrics_per_candidate'][0]} "
                  f"metrics per candidate ({rows_ten} rows): {ten} s; with 1 ({rows_one} rows): {one} s; "
                  f"ratio {variant['ratio']} (median of {results.get('repeat', 1)} each)."]
    return "\n".join(lines) + "\n"



class LagSampler(threading.Thread):
    """On the primary, every 20 ms: the replicas' largest replay_lag and WAL bytes not replayed."""

    def __init__(self, admin: sa.Engine):
        super().__init__(daemon=True)
        self.admin = admin
        self.stop_event = threading.Event()
        self.max_ms = 0.0
        self.max_bytes = 0
        self.samples = 0
        self.attached = True  # a replica was streaming at every sample

    def run(self) -> None:
        with self.admin.connect() as conn:
            while not self.stop_event.is_set():
                ms, nbytes = conn.execute(sa.text("""
                    SELECT max(EXTRACT(epoch FROM replay_lag) * 1000),
                           max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))
                    FROM pg_stat_replication""")).one()
                self.max_ms = max(self.max_ms, float(ms or 0))
                self.max_bytes = max(self.max_bytes, int(nbytes or 0))
                self.samples += 1
                self.attached = self.attached and nbytes is not None
                time.sleep(0.02)

    def finish(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join()
        return {"max_replay_lag_ms": round(self.max_ms, 1), "max_lag_bytes": self.max_bytes,
                "samples": self.samples, "replica_streaming_throughout": self.attached}


def _wait_replayed(admin: sa.Engine, timeout_s: float = 300) -> None:
    with admin.connect() as conn:
        lsn = conn.execute(sa.text("SELECT pg_current_wal_lsn()::text")).scalar_one()
        deadline = time.monotonic() + timeout_s
        while not conn.execute(sa.text("SELECT bool_and(replay_lsn >= CAST(:l AS pg_lsn)) "
                                       "FROM pg_stat_replication"), {"l": lsn}).scalar():
            if time.monotonic() > deadline:
                raise SystemExit(f"the replica did not replay up to {lsn} in {timeout_s:.0f} s")
            time.sleep(0.05)


def replica_lag(args: argparse.Namespace) -> None:
    """Each milestone, batched as migrate runs it, on a primary with a streaming replica of its
    own (pg_basebackup -R), once with throttling off (--no-throttle) and once with the
    defaults (1.5 s / 16 MB): the replica's largest lag while it ran, sampled every 20 ms.
    Each run starts on a fresh copy with the replica caught up; the throttled copy goes on
    to the next milestone. No application writer runs meanwhile."""
    base = args.data_dir.resolve().parent / "replica-lag"
    shutil.rmtree(base, ignore_errors=True)
    primary = SandboxServer(base / "primary")
    replica = SandboxServer(base / "replica")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"seeding {args.scale} ...", flush=True)
    _toolkit("sandbox", "--data-dir", str(base / "primary"), "seed", "--scale", args.scale,
             "--seed", str(args.seed))
    status = primary.status()
    replica._prepare_dirs()
    # A replication slot keeps every WAL segment until the replica has it (the copies below
    # write gigabytes of WAL, and checkpoints would otherwise remove what it still needs).
    primary._run([str(_bin("pg_basebackup")), "-D", str(replica.pgdata), "-R", "-X", "stream", "-c", "fast",
                  "-C", "-S", "bench_replica", "-h", str(status.socket_dir), "-p", str(status.port),
                  "-U", SUPERUSER])
    replica.start()
    url = sa.make_url(status.url())
    admin = create_engine(status.url("postgres"), isolation_level="AUTOCOMMIT")
    target = batch_target(args.batch_size, args.target_batch_ms)
    results: dict[str, Any] = {"scale": args.scale, "target_batch_ms": target, "milestones": {}}
    try:
        for milestone in registry.MILESTONES:
            runs = {}
            for throttle in ("off", "on"):
                copy = _fresh_copy(admin, url, f"bench_lag_{throttle}")
                _wait_replayed(admin)
                options = RunOptions(batch_size=args.batch_size or RunOptions.batch_size,
                                     target_batch_ms=target, statement_timeout_ms=600_000,
                                     no_throttle=throttle == "off")
                print(f"{milestone}: throttling {throttle} ...", flush=True)
                sampler = LagSampler(admin)
                sampler.start()
                engine = create_engine(copy)
                started = time.perf_counter()
                try:
                    result = Runner(
                        engine, options, plan=registry.plan(), command="scripts/bench.py --replica-lag"
                    ).migrate(registry.get(milestone))
                finally:
                    seconds = time.perf_counter() - started
                    lag = sampler.finish()
                    engine.dispose()
                runs[throttle] = {**lag, "seconds": round(seconds, 3), "rows": result.rows,
                                  "verified": bool(result.verify and result.verify.ok),
                                  "throttled_seconds": result.throttled_seconds}
            results["milestones"][milestone] = runs
            print(json.dumps({milestone: runs}), flush=True)
            _drop(admin, "bench_lag_off")
            _drop(admin, url.database)
            with admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "bench_lag_on" RENAME TO "{url.database}"'))
    finally:
        admin.dispose()
        replica.stop()
        primary.stop()
    lines = [f"# Replica lag at {args.scale} scale (one streaming replica, same host)", "",
             "| milestone | throttling | seconds | rows | max replay_lag | max bytes behind | waited |",
             "|---|---|---:|---:|---:|---:|---|"]
    for milestone, runs in results["milestones"].items():
        for throttle, run in runs.items():
            waited = ", ".join(f"{k} {v:.1f} s" for k, v in run["throttled_seconds"].items()) or "-"
            lines.append(f"| {milestone} | {throttle} | {run['seconds']:.1f} | {run['rows']} | "
                         f"{run['max_replay_lag_ms']:.0f} ms | {run['max_lag_bytes'] / 1024 / 1024:.1f} MB | "
                         f"{waited} |")
    (args.out / f"{args.scale}-replica-lag.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{args.scale}-replica-lag.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
