"""The database's health, read on the primary between batches: wait while it is poor.

GitLab's batched background migrations pause on the database's health, and gh-ost waits
while a replica lags (``--max-lag-millis 1500``) or a flag file exists. The engine reads
these signals before every batch and every schema change, and waits while one is over
its limit, re-reading every half second:

- ``replica_lag``: every replica in ``pg_stat_replication``, as time (``replay_lag``) and
  as bytes of WAL not yet replayed (``pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)``).
  Bytes matter: while a replica's replay is paused its ``replay_lag`` stays at a few
  milliseconds. A replica attached but not replaying (not ``streaming``, or no
  ``replay_lsn``) counts as lagging.
- ``vacuum``: a VACUUM (autovacuum or manual, anti-wraparound said so) on a table the
  pass or schema change writes (``pg_stat_progress_vacuum``).
- ``long_transaction``: a transaction open longer than the limit in another session of
  this database (it holds back what VACUUM may remove; the toolkit's own sessions, those
  whose ``application_name`` starts with ``toolkit``, are left out).
- ``archiving``: WAL archiving failed since the run started and has not succeeded since
  (``pg_stat_archiver``), or falls behind: more WAL segments wait to be archived than when
  the run started, by more than ``--max-archive-backlog`` (``pg_ls_archive_statusdir()``).
- ``wal_rate``: the primary writes WAL faster than ``--max-wal-rate`` MB/s over the last
  few seconds (walrate.py; off unless given).
- ``throttle_query``: the operator's own query returned true.
- ``flag_file``: the operator's flag file exists.

Signals the role cannot read (other sessions' statistics need ``pg_monitor`` or
``pg_read_all_stats``) are named once, in a warning when the run starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.db import TIMEOUTS_OPTION
from toolkit.engine.settings import Limits
from toolkit.engine.walrate import SIGNAL as WAL_RATE
from toolkit.engine.walrate import WalRate
from toolkit.errors import UsageProblem

POLL_S = 0.5
# A health read waits briefly for anything: it must never become what slows the database.
READ_TIMEOUTS = (1000, 5000)

SIGNALS = ("replica_lag", "vacuum", "long_transaction", "archiving", WAL_RATE, "throttle_query",
           "flag_file")


@dataclass
class Reading:
    signal: str
    over: bool
    detail: str
    readable: bool = True
    # The number compared with the limit, where the signal has one (for the event stream):
    # replica lag in ms, a transaction's age in s, WAL segments behind, WAL MB/s.
    value: float | None = None
    limit: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "over": self.over, "detail": self.detail,
                "readable": self.readable}


@dataclass
class Baseline:
    """What the run found when it started: archiver failures so far, what the role can read."""

    archive_failed_count: int | None = None
    archive_backlog: int | None = None  # segments waiting to be archived (None: unreadable)
    can_read_stats: bool = True
    in_recovery: bool = False


def size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def baseline(conn: Connection) -> Baseline:
    row = conn.execute(sa.text("""
        SELECT pg_is_in_recovery(), pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),
               (SELECT failed_count FROM pg_stat_archiver)""")).one()
    return Baseline(archive_failed_count=row[2], can_read_stats=bool(row[1]), in_recovery=bool(row[0]),
                    archive_backlog=_archive_backlog(conn))


def _archive_backlog(conn: Connection) -> int | None:
    """WAL segments done and waiting for the archiver (their ``.ready`` files); None where
    archiving is off or the role may not list pg_wal/archive_status (pg_monitor may)."""
    # Two statements: PostgreSQL checks EXECUTE on every function of a plan when it starts
    # the plan, so a CASE around the call would not keep a role without it from failing.
    readable = conn.execute(sa.text("""
        SELECT current_setting('archive_mode') <> 'off'
               AND has_function_privilege('pg_ls_archive_statusdir()', 'EXECUTE')""")).scalar()
    if not readable:
        return None
    return conn.execute(sa.text(
        "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'")).scalar()


def unreadable(conn: Connection, base: Baseline) -> list[str]:
    """The signals this role cannot read, in words (empty when it reads them all)."""
    found = []
    archiving = conn.execute(sa.text("SELECT current_setting('archive_mode') <> 'off'")).scalar()
    if archiving and base.archive_backlog is None:
        found.append("the WAL segments waiting to be archived cannot be listed (pg_ls_archive_statusdir "
                     "is granted to pg_monitor), so the archiver falling behind is not waited for; "
                     "its failures still are")
    if base.can_read_stats:
        return found
    replicas = conn.execute(sa.text("SELECT count(*) FROM pg_stat_replication")).scalar_one()
    role = conn.execute(sa.text("SELECT current_user")).scalar_one()
    return [f"role {role!r} is not a member of pg_monitor (nor pg_read_all_stats), so the lag of the "
            f"{replicas} replica(s) attached, other roles' open transactions and VACUUMs run by other "
            "roles (autovacuum included) cannot be read and are not waited for; "
            "`GRANT pg_monitor TO " + role + "` lets the toolkit throttle on them", *found]


def _replica_lag(conn: Connection, limits: Limits, base: Baseline) -> Reading:
    if base.in_recovery:
        return Reading("replica_lag", False, "not read: this server is a replica", readable=False)
    rows = conn.execute(sa.text("""
        SELECT coalesce(nullif(application_name, ''), 'pid ' || pid) AS name,
               coalesce(host(client_addr), 'local socket') AS addr, state,
               replay_lsn IS NULL AS no_replay,
               EXTRACT(epoch FROM replay_lag) * 1000 AS lag_ms,
               pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS lag_bytes
        FROM pg_stat_replication ORDER BY 1""")).all()
    if not rows:
        return Reading("replica_lag", False, "no replica attached")
    if not base.can_read_stats:
        return Reading("replica_lag", False, f"{len(rows)} replica(s) attached; their lag is not "
                                             "readable by this role", readable=False)
    limit = f"limit {limits.max_replica_lag_ms / 1000:g} s / {size(limits.max_replica_lag_bytes)}"
    lagging, worst = [], (0.0, 0)
    for r in rows:
        who = f"replica {r.name!r} at {r.addr}"
        if r.state != "streaming" or r.no_replay:
            lagging.append(f"{who} is attached but not replaying (state {r.state}, "
                           f"replay position {'unknown' if r.no_replay else 'known'})")
            continue
        ms, nbytes = float(r.lag_ms or 0.0), int(r.lag_bytes or 0)
        worst = (max(worst[0], ms), max(worst[1], nbytes))
        if ms > limits.max_replica_lag_ms or nbytes > limits.max_replica_lag_bytes:
            lagging.append(f"{who} is {ms / 1000:.1f} s / {size(nbytes)} behind ({limit})")
    if lagging:
        return Reading("replica_lag", True, "; ".join(lagging), value=worst[0],
                       limit=limits.max_replica_lag_ms)
    return Reading("replica_lag", False, f"{len(rows)} replica(s), at most {worst[0] / 1000:.1f} s / "
                                         f"{size(worst[1])} behind ({limit})")


def _vacuum(conn: Connection, tables: tuple[str, ...]) -> Reading:
    if not tables:
        return Reading("vacuum", False, "no table to watch")
    rows = conn.execute(sa.text("""
        SELECT c.relname, v.phase, a.backend_type = 'autovacuum worker' AS auto,
               coalesce(a.query, '') ILIKE '%wraparound%' AS wraparound,
               v.heap_blks_scanned, v.heap_blks_total
        FROM pg_stat_progress_vacuum v
        JOIN pg_class c ON c.oid = v.relid
        LEFT JOIN pg_stat_activity a ON a.pid = v.pid
        WHERE v.datname = current_database()
          AND c.oid IN (SELECT to_regclass(t) FROM unnest(CAST(:tables AS text[])) t)
        ORDER BY 1"""), {"tables": list(tables)}).all()
    if not rows:
        return Reading("vacuum", False, f"no VACUUM on {', '.join(tables)}")
    said = [f"{'an autovacuum' if r.auto else 'a VACUUM'}"
            f"{' to prevent wraparound' if r.wraparound else ''} is running on {r.relname} "
            f"({r.phase}, {r.heap_blks_scanned} of {r.heap_blks_total} blocks scanned)" for r in rows]
    return Reading("vacuum", True, "; ".join(said))


def _long_transaction(conn: Connection, limits: Limits) -> Reading:
    rows = conn.execute(sa.text("""
        SELECT pid, usename, application_name, state,
               EXTRACT(epoch FROM clock_timestamp() - xact_start) AS age
        FROM pg_stat_activity
        WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()
          AND backend_type = 'client backend' AND datname = current_database()
          AND coalesce(application_name, '') NOT LIKE 'toolkit%'
        ORDER BY xact_start LIMIT 3""")).all()
    limit = f"limit {limits.max_transaction_age_s:g} s"
    over = [r for r in rows if r.age > limits.max_transaction_age_s]
    if over:
        return Reading("long_transaction", True, "; ".join(
            f"a transaction of pid {r.pid} ({r.usename}, {r.application_name or 'no application_name'}, "
            f"{r.state}) has been open {r.age:.1f} s ({limit})" for r in over),
            value=round(float(max(r.age for r in over)), 3), limit=limits.max_transaction_age_s)
    oldest = f"the oldest open for {rows[0].age:.1f} s" if rows else "none open"
    return Reading("long_transaction", False, f"other transactions: {oldest} ({limit})")


def _archiving(conn: Connection, base: Baseline, limits: Limits) -> Reading:
    row = conn.execute(sa.text("""
        SELECT current_setting('archive_mode') AS mode, failed_count, last_failed_wal,
               last_failed_time, last_archived_time,
               last_failed_time > coalesce(last_archived_time, '-infinity') AS failing
        FROM pg_stat_archiver""")).one()
    if row.mode == "off":
        return Reading("archiving", False, "archive_mode is off")
    since = base.archive_failed_count if base.archive_failed_count is not None else row.failed_count
    if row.failed_count > since and row.failing:
        return Reading("archiving", True, f"WAL archiving is failing: {row.failed_count - since} "
                                          f"failure(s) since the run started, the last on "
                                          f"{row.last_failed_wal}, none archived since")
    backlog = _archive_backlog(conn)
    if backlog is not None and base.archive_backlog is not None:
        behind = backlog - base.archive_backlog
        if behind > limits.max_archive_backlog:
            return Reading("archiving", True, f"WAL archiving is falling behind: {backlog} segments "
                                              f"wait to be archived, {behind} more than when the run "
                                              f"started (limit {limits.max_archive_backlog})",
                           value=behind, limit=limits.max_archive_backlog)
    waiting = "" if backlog is None else f", {backlog} segments waiting"
    return Reading("archiving", False, f"archiving works ({row.failed_count} failures in all, "
                                       f"{row.failed_count - since} since the start{waiting})")


def _wal_rate(conn: Connection, meter: WalRate | None) -> Reading | None:
    if meter is None:
        return None
    if not meter.sample(conn):
        return Reading(WAL_RATE, False, "not read: this server is a replica", readable=False)
    rate, limit = meter.rate_mb_s(), f"limit {meter.limit_mb_s:g} MB/s"
    if rate is None:
        return Reading(WAL_RATE, False, f"not measured yet ({limit})")
    return Reading(WAL_RATE, rate > meter.limit_mb_s,
                   f"the primary wrote {rate:.3f} MB/s of WAL over the last {meter.span_s():.1f} s "
                   f"({limit})", value=round(rate, 6), limit=meter.limit_mb_s)


def _throttle_query(conn: Connection, limits: Limits) -> Reading | None:
    if not limits.throttle_query:
        return None
    answer = conn.execute(sa.text(limits.throttle_query)).scalar()
    return Reading("throttle_query", bool(answer),
                   f"--throttle-query returned {answer!r}" + (" (wait while true)" if answer else ""))


THROTTLE_QUERY_EXAMPLE = ("give a query that returns one boolean (true: wait), e.g. "
                          "--throttle-query \"SELECT count(*) > 50 FROM pg_stat_activity\"")


def check_throttle_query(engine: Engine, query: str) -> None:
    """Refuse, as a usage error, a --throttle-query that does not run in a health read (a
    typo, a table that is not there, a write, longer than the read's timeout) or answers
    neither true nor false (``SELECT count(*) ...`` would keep a run waiting for ever).
    Asked before the run is recorded, so a refused query leaves no run row behind."""
    try:
        with short_read(engine) as conn:
            answer = conn.execute(sa.text(query)).scalar()
    except DBAPIError as exc:
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise UsageProblem(f"--throttle-query does not run: {first}", THROTTLE_QUERY_EXAMPLE) from exc
    if answer is not None and not isinstance(answer, bool):
        raise UsageProblem(f"--throttle-query returns {answer!r} ({type(answer).__name__}), not true or "
                           "false: the run would wait while it is anything but false",
                           THROTTLE_QUERY_EXAMPLE)


def _flag_file(limits: Limits) -> Reading | None:
    if not limits.throttle_flag_file:
        return None
    exists = os.path.exists(limits.throttle_flag_file)
    return Reading("flag_file", exists, f"flag file {limits.throttle_flag_file} "
                                        f"{'exists (remove it to go on)' if exists else 'is absent'}")


def read(conn: Connection, tables: tuple[str, ...], limits: Limits, base: Baseline,
         wal: WalRate | None = None) -> list[Reading]:
    """Every signal's reading now, over its limit or not. The WAL rate needs samples over
    time, so only a run's throttle (which keeps ``wal``) reads it."""
    readings = [_replica_lag(conn, limits, base), _vacuum(conn, tables),
                _long_transaction(conn, limits)]
    if not base.in_recovery:
        readings.append(_archiving(conn, base, limits))
    readings += [r for r in (_wal_rate(conn, wal), _throttle_query(conn, limits), _flag_file(limits))
                 if r is not None]
    return readings


def readings_now(engine: Engine, tables: tuple[str, ...], limits: Limits | None = None) -> list[Reading]:
    """What ``toolkit plan`` shows: every signal's reading, in one read-only transaction."""
    with short_read(engine) as conn:
        base = baseline(conn)
        return read(conn, tables, limits or Limits(), base)


class short_read:
    """A short READ ONLY transaction with brief timeouts, always rolled back. It names itself
    ``toolkit health`` in pg_stat_activity for its own length only, so a DBA (or a test)
    looking for the session that runs batches is not shown the throttle's reads."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __enter__(self) -> Connection:
        self._conn = self.engine.connect()
        conn = self._conn.execution_options(postgresql_readonly=True,
                                            **{TIMEOUTS_OPTION: READ_TIMEOUTS})
        conn.execute(sa.text("SELECT set_config('application_name', 'toolkit health', true)"))
        return conn

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.rollback()
        finally:
            self._conn.close()
