"""The toolkit's memory in its own schema: runs (history), checkpoints, milestone states.

Readers here work on a database that has never seen the toolkit (they report "nothing
yet" instead of failing), which is what lets a dry run stay read-only.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import __version__
from toolkit.engine import fenced
from toolkit.engine.results import MilestoneState, Outcome
from toolkit.schema.migrations import own_schema_exists
from toolkit.schema.own import SCHEMA


@dataclass
class Checkpoint:
    milestone: str
    step: str
    last_key: int | None
    upper_key: int | None
    rows_done: int
    batches_done: int
    completed_at: datetime | None
    run_id: int | None = None  # the run that wrote it last


# -- runs ------------------------------------------------------------------------------
def start_run(conn: Connection, command: str, milestone: str | None, options: dict[str, Any]) -> int:
    os_user: str | None
    try:
        os_user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        os_user = os.environ.get("USER")
    run_id = conn.execute(sa.text(f"""
        INSERT INTO {SCHEMA}.runs (command, milestone, options, database_user, os_user, host,
                                   toolkit_version)
        VALUES (:command, :milestone, CAST(:options AS jsonb), current_user, :os_user, :host, :version)
        RETURNING id
    """), {"command": command, "milestone": milestone, "options": json.dumps(options, default=str),
           "os_user": os_user, "host": socket.gethostname(), "version": __version__}).scalar_one()
    fenced.commit(conn)
    return int(run_id)


def finish_run(conn: Connection, run_id: int, outcome: Outcome, rows_by_step: dict[str, int],
               error: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """``extra`` is merged into the run's options: what the run found out about itself
    (``throttled_seconds``, the time it waited on the database's health, by signal)."""
    # Rows the batches recorded as they committed win over the process's own count.
    conn.execute(sa.text(f"""
        UPDATE {SCHEMA}.runs SET finished_at = clock_timestamp(), outcome = :outcome,
               rows_by_step = CAST(:rows AS jsonb) || rows_by_step, error = :error,
               options = coalesce(options, '{{}}'::jsonb) || CAST(:extra AS jsonb)
        WHERE id = :id
    """), {"id": run_id, "outcome": outcome, "rows": json.dumps(rows_by_step), "error": error,
           "extra": json.dumps(extra or {})})
    fenced.commit(conn)


def close_abandoned_runs(conn: Connection, current: int,
                         kept: list[dict[str, Any]] | None = None) -> None:
    """Runs still marked running once a new run holds the lease cannot be going on: they
    were killed or lost their connection before they could say so. Record that, ending
    them at their last commit (the rows they committed are already counted).

    ``kept``: ends that runs could not write at the time (the server was down or its disk
    full) and kept on this machine (engine/unrecorded.py): written as they said, with a note
    that this run wrote them, on those runs only that are still marked running."""
    for end in kept or []:
        conn.execute(sa.text(f"""
            UPDATE {SCHEMA}.runs SET outcome = :outcome,
                   finished_at = COALESCE(last_batch_at, started_at),
                   rows_by_step = CAST(:rows AS jsonb) || rows_by_step,
                   error = :error
            WHERE id = :id AND outcome = :running AND id < :current
        """), {"id": end["run_id"], "outcome": str(end.get("outcome") or Outcome.INTERRUPTED),
               "running": Outcome.RUNNING,
               "rows": json.dumps(end.get("rows") or {}), "current": current,
               "error": (f"{end['error']} " if end.get("error") else "")
                        + f"(recorded by run {current}: the database could not take it then)"})
    conn.execute(sa.text(f"""
        UPDATE {SCHEMA}.runs SET outcome = :unrecorded,
               finished_at = COALESCE(last_batch_at, started_at),
               error = COALESCE(error, 'ended without recording how (killed, or its connection lost); '
                                       'a later run went on from its last commit')
        WHERE outcome = :running AND id < :current
    """), {"current": current, "unrecorded": Outcome.STOPPED_UNRECORDED, "running": Outcome.RUNNING})


def history(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    if not own_schema_exists(conn):
        return []
    rows = conn.execute(sa.text(f"""
        SELECT * FROM {SCHEMA}.runs ORDER BY id DESC LIMIT :limit
    """), {"limit": limit})
    return [dict(r._mapping) for r in rows]


# -- checkpoints -----------------------------------------------------------------------
def read_checkpoint(conn: Connection, milestone: str, step: str) -> Checkpoint | None:
    if not own_schema_exists(conn):
        return None
    row = conn.execute(sa.text(f"""
        SELECT milestone, step, last_key, upper_key, rows_done, batches_done, completed_at, run_id
        FROM {SCHEMA}.checkpoints WHERE milestone = :m AND step = :s
    """), {"m": milestone, "s": step}).one_or_none()
    return Checkpoint(*row) if row else None


def save_checkpoint(conn: Connection, milestone: str, step: str, last_key: int, rows: int,
                    run_id: int, keys: int = 0) -> int | None:
    """Called inside the batch's own transaction: the batch, its checkpoint and the run's
    row count commit together, so history is right even for a run that never got to say
    how it ended.

    The same statement keeps the run's live progress (``run_progress``: what ``toolkit
    status`` shows from any host; engine/live.py) and its WAL: the primary's WAL insert
    position is read here and the bytes since the last batch's checkpoint (or the pass's
    start) are added to ``runs.wal_bytes_by_step``. Returned: those bytes (None when the run
    has no progress row, i.e. was not started through the runner)."""
    wal = conn.execute(sa.text(f"""
        WITH pos AS (SELECT pg_current_wal_insert_lsn() - '0/0' AS lsn),
        live AS (
            UPDATE {SCHEMA}.run_progress p SET pass_keys_done = p.pass_keys_done + :keys,
                   pass_rows = p.pass_rows + :r, pass_batches = p.pass_batches + 1,
                   last_batch_at = clock_timestamp(),
                   last_batch_ms = 1000 * extract(epoch FROM clock_timestamp() - now()),
                   last_batch_keys = :keys, last_batch_rows = :r, wal_lsn = pos.lsn,
                   updated_at = clock_timestamp()
            FROM pos, (SELECT wal_lsn FROM {SCHEMA}.run_progress WHERE run_id = :run) AS before
            WHERE p.run_id = :run
            RETURNING CAST(pos.lsn - before.wal_lsn AS bigint) AS wal
        )
        UPDATE {SCHEMA}.runs SET last_batch_at = clock_timestamp(),
               rows_by_step = rows_by_step || jsonb_build_object(
                   CAST(:s AS text), COALESCE((rows_by_step ->> CAST(:s AS text))::bigint, 0) + :r),
               wal_bytes_by_step = CASE WHEN (SELECT wal FROM live) IS NULL THEN wal_bytes_by_step
                   ELSE wal_bytes_by_step || jsonb_build_object(CAST(:s AS text),
                       COALESCE((wal_bytes_by_step ->> CAST(:s AS text))::bigint, 0)
                       + (SELECT wal FROM live)) END
        WHERE id = :run
        RETURNING (SELECT wal FROM live)
    """), {"s": step, "r": rows, "run": run_id, "keys": keys}).scalar()
    conn.execute(sa.text(f"""
        INSERT INTO {SCHEMA}.checkpoints (milestone, step, last_key, rows_done, batches_done, run_id,
                                          completed_at, updated_at)
        VALUES (:m, :s, :k, :r, 1, :run, NULL, clock_timestamp())
        ON CONFLICT (milestone, step) DO UPDATE SET
            last_key = EXCLUDED.last_key,
            rows_done = {SCHEMA}.checkpoints.rows_done + EXCLUDED.rows_done,
            batches_done = {SCHEMA}.checkpoints.batches_done + 1,
            run_id = EXCLUDED.run_id, completed_at = NULL, updated_at = EXCLUDED.updated_at
    """), {"m": milestone, "s": step, "k": last_key, "r": rows, "run": run_id})
    return wal


def restart_checkpoint(conn: Connection, milestone: str, step: str, run_id: int,
                       upper_key: int) -> None:
    """A pass starts (again) from key 0 up to ``upper_key``, counters reset."""
    conn.execute(sa.text(f"""
        INSERT INTO {SCHEMA}.checkpoints (milestone, step, last_key, upper_key, rows_done,
                                          batches_done, run_id)
        VALUES (:m, :s, 0, :u, 0, 0, :run)
        ON CONFLICT (milestone, step) DO UPDATE SET last_key = 0, upper_key = :u, rows_done = 0,
            batches_done = 0, run_id = EXCLUDED.run_id, completed_at = NULL,
            updated_at = clock_timestamp()
    """), {"m": milestone, "s": step, "run": run_id, "u": upper_key})


def extend_checkpoint(conn: Connection, milestone: str, step: str, last_key: int,
                      upper_key: int) -> None:
    """A catch-up round: the pass goes on from its old bound to a new one."""
    conn.execute(sa.text(f"""
        UPDATE {SCHEMA}.checkpoints SET last_key = :k, upper_key = :u, updated_at = clock_timestamp()
        WHERE milestone = :m AND step = :s
    """), {"m": milestone, "s": step, "k": last_key, "u": upper_key})


def complete_checkpoint(conn: Connection, milestone: str, step: str, run_id: int) -> None:
    conn.execute(sa.text(f"""
        INSERT INTO {SCHEMA}.checkpoints (milestone, step, last_key, run_id, completed_at)
        VALUES (:m, :s, 0, :run, clock_timestamp())
        ON CONFLICT (milestone, step) DO UPDATE SET completed_at = clock_timestamp(),
            run_id = EXCLUDED.run_id, updated_at = clock_timestamp()
    """), {"m": milestone, "s": step, "run": run_id})


def forget_completed(conn: Connection, milestone: str, steps: list[str]) -> None:
    """The completed checkpoints of ``steps`` are forgotten: a run that does not resume
    walks those passes from the start, and only what it finishes counts as finished should
    it be resumed (engine/resume.py). A checkpoint of a pass begun is kept."""
    conn.execute(sa.text(f"""
        DELETE FROM {SCHEMA}.checkpoints
        WHERE milestone = :m AND step = ANY(:steps) AND completed_at IS NOT NULL
    """), {"m": milestone, "steps": steps})


def clear_checkpoints(conn: Connection, milestone: str, prefix: str = "") -> None:
    conn.execute(sa.text(f"DELETE FROM {SCHEMA}.checkpoints WHERE milestone = :m AND step LIKE :p"),
                 {"m": milestone, "p": f"{prefix}%"})


def checkpoints(conn: Connection, milestone: str) -> list[Checkpoint]:
    if not own_schema_exists(conn):
        return []
    rows = conn.execute(sa.text(f"""
        SELECT milestone, step, last_key, upper_key, rows_done, batches_done, completed_at, run_id
        FROM {SCHEMA}.checkpoints WHERE milestone = :m ORDER BY step
    """), {"m": milestone})
    return [Checkpoint(*r) for r in rows]


# -- milestone states ------------------------------------------------------------------
def milestone_state(conn: Connection, milestone: str) -> dict[str, Any]:
    """The milestone's row, its ``state`` a :class:`MilestoneState` (``not started`` when
    there is no row)."""
    if not own_schema_exists(conn):
        return {"state": MilestoneState.NOT_STARTED}
    row = conn.execute(sa.text(f"""
        SELECT state, applied_at, verified_at, rolled_back_at, last_run_id, updated_at
        FROM {SCHEMA}.milestones WHERE milestone = :m
    """), {"m": milestone}).one_or_none()
    if row is None:
        return {"state": MilestoneState.NOT_STARTED}
    return {**row._mapping, "state": MilestoneState(row.state)}


def set_milestone_state(conn: Connection, milestone: str, state: MilestoneState,
                        run_id: int | None) -> None:
    stamp = {MilestoneState.APPLIED: "applied_at", MilestoneState.VERIFIED: "verified_at",
             MilestoneState.ROLLED_BACK: "rolled_back_at"}.get(state)
    extra = f", {stamp} = clock_timestamp()" if stamp else ""
    insert_extra = (f", {stamp}", ", clock_timestamp()") if stamp else ("", "")
    conn.execute(sa.text(f"""
        INSERT INTO {SCHEMA}.milestones (milestone, state, last_run_id{insert_extra[0]})
        VALUES (:m, :s, :run{insert_extra[1]})
        ON CONFLICT (milestone) DO UPDATE SET state = :s, last_run_id = COALESCE(:run,
            {SCHEMA}.milestones.last_run_id), updated_at = clock_timestamp(){extra}
    """), {"m": milestone, "s": state, "run": run_id})
    fenced.commit(conn)

