"""What watching and steering a run costs a batch, measured for ``scripts/bench.py``.

A run that is watched (``--events``, ``--metrics-textfile``) and steerable (``toolkit
control``, read at every batch boundary) does, per batch, on top of the batch itself:

* ``events``: one JSON line written and flushed (``toolkit/cli/observe.py``);
* ``metrics``: the textfile rendered and replaced atomically (``toolkit/cli/metrics.py``);
* ``control``: one read of the unapplied requests (``toolkit/engine/control.py``), ended
  without a commit;
* ``progress``: what the batch's checkpoint statement does beyond the row count it always
  wrote: the live progress ``toolkit status`` reads and the WAL position
  (``state.save_checkpoint``); paid by every run, watched or not.

Each is timed against the same loop without it, in blocks that alternate (drift on a shared
machine lands on all of them), on a copy of the benchmark's database that is dropped after;
the median of each is the cost per batch. Compared with a batch of the default target
(``toolkit migrate`` sizes batches toward a second) and with the batches the benchmark's
own batched runs took.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from toolkit.cli.metrics import MetricsTextfile
from toolkit.cli.observe import EventStream
from toolkit.db import create_engine
from toolkit.engine import state
from toolkit.engine.budget import Budget
from toolkit.engine.control import Steering
from toolkit.engine.settings import RunOptions
from toolkit.sandbox.app_writer import percentile
from toolkit.schema.migrations import ensure_own_tables
from toolkit.schema.own import SCHEMA

BATCHES = 600  # per kind
BLOCK = 50
DEFAULT_BATCH_MS = 1000.0
BATCH = {"milestone": "milestone-1", "pass_name": "convert-candidate-packages", "run_id": 1,
         "key_from": 1000, "key_to": 2000, "keys": 1000, "rows": 998, "ms": 812.345, "retries": 0,
         "wal_bytes": 123456}

# The row count every batch always wrote, and the statement that now writes it with the
# run's live progress and WAL (state.save_checkpoint's first statement).
_ROWS_ONLY = sa.text(f"""
    UPDATE {SCHEMA}.runs SET last_batch_at = clock_timestamp(),
           rows_by_step = rows_by_step || jsonb_build_object(
               CAST(:s AS text), COALESCE((rows_by_step ->> CAST(:s AS text))::bigint, 0) + :r)
    WHERE id = :run""")
_CHECKPOINT = sa.text(f"""
    INSERT INTO {SCHEMA}.checkpoints (milestone, step, last_key, rows_done, batches_done, run_id,
                                      completed_at, updated_at)
    VALUES (:m, :s, :k, :r, 1, :run, NULL, clock_timestamp())
    ON CONFLICT (milestone, step) DO UPDATE SET
        last_key = EXCLUDED.last_key,
        rows_done = {SCHEMA}.checkpoints.rows_done + EXCLUDED.rows_done,
        batches_done = {SCHEMA}.checkpoints.batches_done + 1,
        run_id = EXCLUDED.run_id, completed_at = NULL, updated_at = EXCLUDED.updated_at""")


def observe_cost(copy: sa.URL) -> dict[str, Any]:
    """The per-batch cost of each, in ms (median), on ``copy``: a copy of the benchmark's
    database that the caller drops after."""
    engine = create_engine(copy)
    timings: dict[str, list[float]] = {k: [] for k in ("none", "events", "metrics", "control",
                                                       "checkpoint_before", "progress")}
    try:
        with engine.connect() as conn:
            ensure_own_tables(conn)
            run_id = state.start_run(conn, "scripts/bench.py observe cost", "milestone-1", {})
            conn.execute(sa.text(f"INSERT INTO {SCHEMA}.run_progress (run_id, wal_lsn) "
                                 "VALUES (:r, pg_current_wal_insert_lsn() - '0/0')"), {"r": run_id})
            conn.commit()
        with tempfile.TemporaryDirectory() as tmp:
            events = EventStream(str(Path(tmp) / "events.jsonl"), "0" * 32, lambda: ())
            metrics = MetricsTextfile(str(Path(tmp) / "toolkit.prom"), "gitlabhq_production")
            metrics.record("pass_start", {**BATCH, "keys": 100_000})
            control = Steering(engine, run_id, RunOptions(), Budget(RunOptions()))
            control.start()

            def timed(kind: str, work: Any) -> None:
                for _ in range(BLOCK):
                    began = time.perf_counter()
                    work()
                    timings[kind].append(time.perf_counter() - began)

            with engine.connect() as conn:
                values = {"s": BATCH["pass_name"], "r": 998, "run": run_id, "m": "bench-observe", "k": 1}

                def checkpoint_before() -> None:  # what a batch's checkpoint was before
                    conn.execute(_ROWS_ONLY, values)
                    conn.execute(_CHECKPOINT, values)

                def progress() -> None:  # and what it is now, live progress and WAL with it
                    state.save_checkpoint(conn, "bench-observe", BATCH["pass_name"], 1, 998, run_id, 1000)

                for _ in range(BATCHES // BLOCK):
                    timed("none", lambda: None)
                    timed("events", lambda: events.record("batch", BATCH))
                    timed("metrics", lambda: metrics.record("batch", BATCH))
                    timed("control", control.poll)
                    timed("checkpoint_before", checkpoint_before)
                    timed("progress", progress)
                    conn.rollback()  # a block's updates, never committed
            events.close()
    finally:
        engine.dispose()
    ms = {kind: percentile(values, 50) * 1000 for kind, values in timings.items()}
    found = {f"{kind}_ms": round(ms[kind] - ms["none"], 3) for kind in ("events", "metrics", "control")}
    # the checkpoint now against the checkpoint before: the same two statements, the first
    # of them now also keeping the live progress and reading the WAL position
    found["progress_ms"] = round(ms["progress"] - ms["checkpoint_before"], 3)
    found["checkpoint_ms"] = round(ms["progress"] - ms["none"], 3)
    found["watched_ms"] = round(sum(found[f"{k}_ms"] for k in ("events", "metrics", "control",
                                                              "progress")), 3)
    found["share_of_default_batch_pct"] = round(100 * found["watched_ms"] / DEFAULT_BATCH_MS, 3)
    found["batches_timed"] = BATCHES
    return found


def share_of(cost: dict[str, Any], batch_p50_ms: float | None) -> float | None:
    """The watched cost as a percentage of a batch of ``batch_p50_ms``."""
    if not cost or not batch_p50_ms:
        return None
    return round(100 * cost["watched_ms"] / batch_p50_ms, 2)


def lines(results: dict[str, Any]) -> list[str]:
    """The markdown paragraph: the cost per batch, and the WAL each milestone wrote a row."""
    cost = results.get("observe_per_batch")
    out: list[str] = []
    if cost:
        shares = "; ".join(f"{name} {share_of(cost, m['batched'].get('batch_p50_ms'))} % of its "
                           f"p50 batch ({m['batched'].get('batch_p50_ms')} ms)"
                           for name, m in results.get("milestones", {}).items())
        out += [f"Watching and steering a run, per batch (median of {cost['batches_timed']} each, "
                f"alternating): the --events line {cost['events_ms']} ms, the --metrics-textfile "
                f"rewrite {cost['metrics_ms']} ms, the `toolkit control` read {cost['control_ms']} ms, "
                f"the live progress and WAL in the checkpoint statement {cost['progress_ms']} ms: "
                f"{cost['watched_ms']} ms a batch, {cost['share_of_default_batch_pct']} % of a batch "
                f"of the default second" + (f"; {shares}" if shares else "") + ".", ""]
    wal = [f"{name} {m['batched'].get('wal_bytes')} bytes ({m['batched'].get('wal_bytes_per_row')} "
           "a row)" for name, m in results.get("milestones", {}).items()
           if m["batched"].get("wal_bytes") is not None]
    if wal:
        out += ["WAL the batched apply's batches wrote (runs.wal_bytes_by_step): " + "; ".join(wal)
                + ".", ""]
    return out
