"""Benchmark: each milestone batched vs. the same change as one set-based statement.

    python scripts/bench.py --scale gitlab-com            # about two minutes
    python scripts/bench.py --scale x25 --batch-size 5000 # about twenty

Builds a sandbox at the scale (its own data directory, never the default sandbox). Then,
for each milestone in order:

* the **baseline**: a copy of the database (CREATE DATABASE … TEMPLATE) gets the same
  change with every pass done as one batch, i.e. one set-based statement per pass;
* the **batched** apply on the original, as an operator runs it;
* during both, an application-like writer inserts an experiment and a candidate every
  20 ms; its latencies give the p99 GitLab's traffic would see.

It also times ``plan`` and ``verify`` and reads the process's peak memory. Results go to
``bench-results/<scale>.json`` and a markdown table ``bench-results/<scale>.md``; the
figure that counts is the throughput ratio batched / set-based, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from toolkit import milestones as registry
from toolkit.db import create_engine
from toolkit.engine.batches import RunOptions
from toolkit.engine.runner import Runner
from toolkit.sandbox.database import seed_sandbox
from toolkit.sandbox.server import SandboxServer


class Writer(threading.Thread):
    """Writes as GitLab does, every 20 ms: an experiment and a candidate (milestones 1-3), or,
    once GitLab no longer writes experiments (milestone 4), a candidate of an existing model."""

    NEW_EXPERIMENT = """
        INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
        SELECT now(), now(), COALESCE(max(iid), 0) + 1, :p, 'bench ' || gen_random_uuid()
        FROM ml_experiments WHERE project_id = :p RETURNING id"""
    CANDIDATE_OF_EXPERIMENT = """
        INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid, project_id)
        VALUES (now(), now(), :e, gen_random_uuid(), :p)"""
    CANDIDATE_OF_MODEL_WITH_EXPERIMENT = """
        INSERT INTO ml_candidates (created_at, updated_at, experiment_id, model_id, eid, project_id)
        SELECT now(), now(), e.id, e.model_id, gen_random_uuid(), e.project_id
        FROM ml_experiments e WHERE e.model_id IS NOT NULL ORDER BY e.id LIMIT 1"""
    CANDIDATE_OF_MODEL = """
        INSERT INTO ml_candidates (created_at, updated_at, model_id, eid, project_id)
        SELECT now(), now(), m.id, gen_random_uuid(), m.project_id FROM ml_models m ORDER BY m.id LIMIT 1"""

    def __init__(self, url: sa.URL, new_experiments: bool):
        super().__init__(daemon=True)
        self.engine = create_engine(url)
        self.new_experiments = new_experiments
        self.stop_event = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def write(self, conn: sa.Connection) -> None:
        if self.new_experiments:
            project = conn.execute(sa.text("SELECT min(id) FROM projects")).scalar()
            exp = conn.execute(sa.text(self.NEW_EXPERIMENT), {"p": project}).scalar()
            conn.execute(sa.text(self.CANDIDATE_OF_EXPERIMENT), {"e": exp, "p": project})
        elif conn.execute(sa.text("SELECT to_regclass('ml_experiments') IS NOT NULL")).scalar():
            conn.execute(sa.text(self.CANDIDATE_OF_MODEL_WITH_EXPERIMENT))
        else:
            conn.execute(sa.text(self.CANDIDATE_OF_MODEL))

    def run(self) -> None:
        while not self.stop_event.is_set():
            started = time.perf_counter()
            try:
                with self.engine.begin() as conn:
                    self.write(conn)
            except Exception as exc:  # counted, not fatal: a benchmark reports what happened
                self.errors.append(type(exc).__name__)
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.02)

    def finish(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join(30)
        self.engine.dispose()
        return {"inserts": len(self.latencies), "errors": len(self.errors),
                "p50_ms": _ms(_percentile(self.latencies, 50)),
                "p99_ms": _ms(_percentile(self.latencies, 99)),
                "max_ms": _ms(max(self.latencies, default=0))}


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _timed_migrate(url: sa.URL, milestone: str, options: RunOptions) -> dict[str, Any]:
    engine = create_engine(url)
    writer = Writer(url, new_experiments=milestone != "milestone-4")
    writer.start()
    try:
        started = time.perf_counter()
        # verify (with its fingerprint comparison) is timed on its own below
        result = Runner(engine, options, command="scripts/bench.py").migrate(registry.get(milestone),
                                                                             verify_after=False)
        seconds = time.perf_counter() - started
    finally:
        traffic = writer.finish()
    # What the writer added at the very end is taken by a second run, as an operator would
    # (not timed): the next milestone's gate needs this one to verify.
    Runner(engine, options).migrate(registry.get(milestone))
    engine.dispose()
    batches = [s for p in result.passes for s in p.batch_seconds]
    return {"seconds": round(seconds, 3), "rows": result.rows,
            "rows_per_second": round(result.rows / seconds) if seconds else None,
            "batches": len(batches),
            "batch_p50_ms": _ms(_percentile(batches, 50)), "batch_p99_ms": _ms(_percentile(batches, 99)),
            "batch_max_ms": _ms(max(batches, default=0)),
            "writer": traffic}


def _copy_database(admin: sa.Engine, source: str, target: str) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)'))
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": source})
        conn.execute(sa.text(f'CREATE DATABASE "{target}" TEMPLATE "{source}"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="gitlab-com", choices=["small", "gitlab-com", "x25"])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("bench-results/sandbox"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_dir.parent.mkdir(parents=True, exist_ok=True)

    server = SandboxServer(args.data_dir.resolve())
    status = server.start()
    print(f"seeding {args.scale} ...", flush=True)
    report = seed_sandbox(status, args.scale, "realistic", args.seed)
    url = sa.make_url(status.url())
    admin = create_engine(status.url("postgres"), isolation_level="AUTOCOMMIT")
    results: dict[str, Any] = {"scale": args.scale, "batch_size": args.batch_size,
                               "seed_seconds": report.seconds, "counts": report.counts, "milestones": {}}
    try:
        for milestone in registry.MILESTONES:
            engine = create_engine(url)
            started = time.perf_counter()
            Runner(engine).plan(registry.get(milestone))
            plan_seconds = time.perf_counter() - started
            engine.dispose()

            # The fingerprint migrate takes first, timed on its own (the copy inherits it).
            engine = create_engine(url)
            started = time.perf_counter()
            Runner(engine).take_baseline(registry.get(milestone))
            fingerprint_seconds = time.perf_counter() - started
            engine.dispose()

            baseline_db = "bench_set_based"
            _copy_database(admin, url.database, baseline_db)
            print(f"{milestone}: set-based baseline ...", flush=True)
            baseline = _timed_migrate(url.set(database=baseline_db), milestone,
                                      RunOptions(batch_size=10**12, statement_timeout_ms=3_600_000))
            print(f"{milestone}: batched ...", flush=True)
            batched = _timed_migrate(url, milestone,
                                     RunOptions(batch_size=args.batch_size, statement_timeout_ms=600_000))
            engine = create_engine(url)
            started = time.perf_counter()
            verified = Runner(engine).verify(registry.get(milestone))
            verify_seconds = time.perf_counter() - started
            engine.dispose()
            results["milestones"][milestone] = {
                "plan_seconds": round(plan_seconds, 3), "verify_seconds": round(verify_seconds, 3),
                "fingerprint_seconds": round(fingerprint_seconds, 3), "verified": verified.ok,
                "batched": batched, "set_based": baseline,
                "throughput_ratio": (round(baseline["seconds"] / batched["seconds"], 3)
                                     if batched["seconds"] else None),
            }
            print(json.dumps(results["milestones"][milestone]), flush=True)
        with admin.connect() as conn:
            conn.execute(sa.text('DROP DATABASE IF EXISTS "bench_set_based" WITH (FORCE)'))
    finally:
        admin.dispose()
        server.stop()
    results["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    (args.out / f"{args.scale}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{args.scale}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Scale {results['scale']}, batch size {results['batch_size']}, "
        f"peak memory of the benchmark process {results.get('peak_memory_mb')} MB.",
        "",
        "| milestone | rows | batched s | set-based s | ratio | batches | batch p50/p99/max ms "
        "| writer p99 ms batched | writer p99 ms set-based | plan s | fingerprint s | verify s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["milestones"].items():
        b, s = m["batched"], m["set_based"]
        lines.append(
            f"| {name} | {b['rows']} | {b['seconds']} | {s['seconds']} | {m['throughput_ratio']} | "
            f"{b['batches']} | {b['batch_p50_ms']}/{b['batch_p99_ms']}/{b['batch_max_ms']} | "
            f"{b['writer']['p99_ms']} | {s['writer']['p99_ms']} | {m['plan_seconds']} | "
            f"{m['fingerprint_seconds']} | {m['verify_seconds']}{'' if m['verified'] else ' (FAILED)'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
