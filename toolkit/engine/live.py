"""A running run's progress, kept where any host can read it: ``toolkit.run_progress``.

The on-call DBA who asks "how far is it, how fast, when will it end, is it waiting?" is
rarely on the runner's host, and the terminal's progress bar is there only. What every
operator reaches is the database, so the run keeps one row of its own there (revision
0011): its phase, the pass under way, its last batch and its waits on the database's
health. ``toolkit status`` reads it (:func:`read`), from any host, in a read-only
transaction.

Who writes what, and what it costs:

- each batch updates the row in its own transaction, in the statement that already writes
  the run's row count (``state.save_checkpoint``): no extra round trip, and the numbers are
  exactly what committed;
- the rest (the run's start, each phase, each pass's start, each wait's start and end) is
  told by the engine as structured events, and :class:`Recorded`, the runner's
  :class:`~toolkit.engine.events.Events`, writes it as it forwards each event: a handful of
  short writes a pass, none a batch. Unfenced, as the run's history row: they describe the
  run, never GitLab's data, and a write that fails (the server went away) is skipped: the
  run's own next statement reports that.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.engine.control import taken_by
from toolkit.engine.events import Events, emit
from toolkit.engine.fenced import UNFENCED
from toolkit.engine.locks import runner_lock_holders
from toolkit.schema.own import SCHEMA

TABLE = f"{SCHEMA}.run_progress"
log = logging.getLogger("toolkit.engine")


class Recorded:
    """The runner's events: everything goes on to ``inner`` (the terminal, ``--events``,
    the metrics file ...), and what ``toolkit status`` needs is also written to the run's
    progress row."""

    def __init__(self, inner: Events, engine: Engine) -> None:
        self.inner = inner
        self.engine = engine
        self.run_id: int | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        return self.inner.secrets

    def say(self, message: str = "") -> None:
        self.inner.say(message)

    def warn(self, message: str) -> None:
        self.inner.warn(message)

    def note(self, message: str) -> None:
        self.inner.note(message)

    def progress(self, total: int | None, name: str) -> Any:
        return self.inner.progress(total, name)

    def __getattr__(self, name: str) -> Any:  # what a caller's own Events has beyond these
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def record(self, name: str, fields: dict[str, Any]) -> None:
        emit(self.inner, name, **fields)
        statement = self._statement(name, fields)
        if statement is not None and self.run_id is not None:
            self._write(*statement)

    def _statement(self, name: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        if name == "run_start":
            self.run_id = fields["run_id"]
            return (f"INSERT INTO {TABLE} (run_id) VALUES (:run) ON CONFLICT (run_id) DO NOTHING", {})
        if name == "run_end":
            return (f"UPDATE {TABLE} SET throttled_since = NULL, throttled_by = NULL, "
                    "updated_at = clock_timestamp() WHERE run_id = :run", {})
        if name == "phase":
            return (f"UPDATE {TABLE} SET phase = :phase, phase_started_at = clock_timestamp(), "
                    "updated_at = clock_timestamp() WHERE run_id = :run", {"phase": fields["phase"]})
        if name == "pass_start":
            return (f"""UPDATE {TABLE} SET pass_name = :name, pass_started_at = clock_timestamp(),
                        pass_key_from = :key_from, pass_keys_total = :keys, pass_keys_done = 0,
                        pass_rows = 0, pass_batches = 0, updated_at = clock_timestamp(),
                        wal_lsn = CASE WHEN NOT pg_is_in_recovery()
                                       THEN pg_current_wal_insert_lsn() - '0/0' END
                    WHERE run_id = :run""",
                    {"name": fields["pass_name"], "key_from": fields["key_from"], "keys": fields["keys"]})
        if name == "throttle" and fields.get("state") == "waiting":
            return (f"UPDATE {TABLE} SET throttled_since = clock_timestamp(), "
                    "throttled_by = CAST(:signals AS jsonb), updated_at = clock_timestamp() "
                    "WHERE run_id = :run",
                    {"signals": json.dumps([s.get("signal") for s in fields.get("signals") or []])})
        if name == "throttle":
            return (f"UPDATE {TABLE} SET throttled_since = NULL, throttled_by = NULL, "
                    "throttled_seconds = CAST(:totals AS jsonb), updated_at = clock_timestamp() "
                    "WHERE run_id = :run",
                    {"totals": json.dumps(fields.get("throttled_seconds") or {})})
        return None

    def _write(self, sql: str, values: dict[str, Any]) -> None:
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(**{UNFENCED: True})
                conn.execute(sa.text(sql), {"run": self.run_id, **values})
                conn.commit()
        except DBAPIError as exc:  # the run's own next statement says what is wrong
            log.debug("run progress not recorded: %s", exc)


# -- reading it: `toolkit status` ----------------------------------------------------------
@dataclass
class LiveRun:
    """The run going now, as ``toolkit status`` shows it (``as_dict`` is its ``--json``)."""

    run_id: int
    command: str
    milestone: str | None
    who: str
    started_at: datetime
    now: datetime
    phase: str | None = None
    phase_started_at: datetime | None = None
    pass_name: str | None = None
    pass_key_from: int | None = None
    keys_total: int | None = None
    keys_done: int = 0
    rows: int = 0  # rows the run changed, all its passes
    pass_rows: int = 0
    batches: int = 0  # the pass's batches by this run
    rate_keys_s: float | None = None
    rate_rows_s: float | None = None
    eta_s: float | None = None
    throttled_seconds: dict[str, float] = field(default_factory=dict)
    throttled_since: datetime | None = None
    throttled_by: list[str] = field(default_factory=list)
    throttled_share: float = 0.0
    last_batch_at: datetime | None = None
    last_batch_ms: float | None = None
    last_batch_keys: int | None = None
    last_batch_rows: int | None = None
    wal_bytes: int = 0
    wal_bytes_by_step: dict[str, int] = field(default_factory=dict)
    controls: list[dict[str, Any]] = field(default_factory=list)
    tracked: bool = True  # False: a run of a toolkit without revision 0011 (no progress row)

    def as_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return value.isoformat() if isinstance(value, datetime) else value

        doc = {k: plain(v) for k, v in self.__dict__.items() if k not in ("now", "controls")}
        doc["controls"] = [{k: plain(v) for k, v in c.items()} for c in self.controls]
        doc["last_batch_age_s"] = (round((self.now - self.last_batch_at).total_seconds(), 3)
                                   if self.last_batch_at else None)
        doc["elapsed_s"] = round((self.now - self.started_at).total_seconds(), 3)
        return doc


def paused_seconds(controls: list[dict[str, Any]], start: datetime, end: datetime) -> float:
    """Seconds between ``start`` and ``end`` the run spent paused by `toolkit control pause`
    (from the pause it took to the resume or abort that ended it)."""
    total, since = 0.0, None
    for c in controls:
        if c["action"] == "pause" and since is None:
            since = c["applied_at"]
        elif c["action"] in ("resume", "abort") and since is not None:
            total += max((min(c["applied_at"], end) - max(since, start)).total_seconds(), 0.0)
            since = None
    if since is not None:
        total += max((end - max(since, start)).total_seconds(), 0.0)
    return total


def _has(conn: Connection, name: str) -> bool:
    return bool(conn.execute(sa.text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar_one())


def running_run_id(conn: Connection) -> int | None:
    """The run going now: the newest run still marked running, while a runner holds the lock
    (a run killed outright is marked running too, but holds nothing)."""
    if not _has(conn, f"{SCHEMA}.runs"):
        return None
    run_id = conn.execute(sa.text(
        f"SELECT max(id) FROM {SCHEMA}.runs WHERE outcome = 'running'")).scalar()
    if run_id is None or not runner_lock_holders(conn):
        return None
    return int(run_id)


def read(conn: Connection, run_id: int) -> LiveRun | None:
    """Run ``run_id``'s progress as it committed it (None: no such run)."""
    run = conn.execute(sa.text(f"""
        SELECT id, command, milestone, database_user, os_user, host, started_at, rows_by_step,
               clock_timestamp() AS now FROM {SCHEMA}.runs WHERE id = :id"""),
        {"id": run_id}).one_or_none()
    if run is None:
        return None
    live = LiveRun(run.id, run.command, run.milestone,
                   f"{run.os_user}@{run.host} as {run.database_user}", run.started_at, run.now,
                   rows=sum((run.rows_by_step or {}).values()))
    if _has(conn, f"{SCHEMA}.run_controls"):
        live.controls = taken_by(conn, run_id)
    row = conn.execute(sa.text(f"""
        SELECT p.*, r.wal_bytes_by_step FROM {TABLE} p JOIN {SCHEMA}.runs r ON r.id = p.run_id
        WHERE p.run_id = :id"""), {"id": run_id}).one_or_none() if _has(conn, TABLE) else None
    if row is None:
        live.tracked = False
        return live
    p = row._mapping
    live.phase, live.phase_started_at = p["phase"], p["phase_started_at"]
    live.pass_name, live.pass_key_from = p["pass_name"], p["pass_key_from"]
    live.keys_total, live.keys_done = p["pass_keys_total"], p["pass_keys_done"]
    live.pass_rows, live.batches = p["pass_rows"], p["pass_batches"]
    live.last_batch_at, live.last_batch_ms = p["last_batch_at"], p["last_batch_ms"]
    live.last_batch_keys, live.last_batch_rows = p["last_batch_keys"], p["last_batch_rows"]
    live.wal_bytes_by_step = {k: int(v) for k, v in (p["wal_bytes_by_step"] or {}).items()}
    live.wal_bytes = sum(live.wal_bytes_by_step.values())
    live.throttled_seconds = dict(p["throttled_seconds"] or {})
    live.throttled_since, live.throttled_by = p["throttled_since"], list(p["throttled_by"] or [])
    # The rate over this run's part of the pass, up to its last batch: --pause-ms and waits
    # on the database's health count (they are part of how fast it goes and will recur); a
    # `toolkit control pause` does not, nor any time since the last batch.
    if p["pass_started_at"] and live.last_batch_at and live.keys_done:
        spent = (live.last_batch_at - p["pass_started_at"]).total_seconds() - paused_seconds(
            live.controls, p["pass_started_at"], live.last_batch_at)
        if spent > 0:
            live.rate_keys_s = live.keys_done / spent
            live.rate_rows_s = live.pass_rows / spent
            if live.keys_total is not None:
                live.eta_s = max(live.keys_total - live.keys_done, 0) / live.rate_keys_s
    waited = sum(live.throttled_seconds.values())
    if live.throttled_since is not None:
        waited += (live.now - live.throttled_since).total_seconds()
    elapsed = (live.now - live.started_at).total_seconds()
    live.throttled_share = min(waited / elapsed, 1.0) if elapsed > 0 else 0.0
    return live
