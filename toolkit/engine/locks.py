"""Locks: one runner at a time, short lock waits, and naming whoever is in the way.

The runner lock is a session-level advisory lock taken with ``pg_try_advisory_lock`` and
*polled*: a blocking ``pg_advisory_lock`` could deadlock with CREATE INDEX CONCURRENTLY,
which waits for every older transaction (including a waiting lock request) to finish.
It lives on a connection of its own in autocommit mode, so it is never idle in a
transaction, and it disappears with the session if the process is killed. That session
turns ``idle_session_timeout`` off for itself (it is idle by design); a session that ends
anyway (a DBA, a restart) takes the lock with it, which the lease (``lease.py``) turns
into a run that commits nothing more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.db import SESSION_NAME_KEY
from toolkit.engine.events import LOGGED, Events
from toolkit.errors import RunnerBusy
from toolkit.timestamps import shown

# pg_try_advisory_lock(int4, int4): 'tkit' and 1. Shows in pg_locks as classid/objid, objsubid 2.
RUNNER_LOCK_KEYS = (0x746B6974, 1)

# SQLSTATEs worth a retry with backoff: the batch was rolled back and can simply run again.
TRANSIENT_STATES = {
    "55P03": "lock timeout",
    "57014": "statement timeout",
    "40P01": "deadlock",
    "40001": "serialization failure",
}
UNIQUE_VIOLATION = "23505"


def runner_lock_holders(conn: Connection) -> list[dict[str, Any]]:
    """Sessions holding the runner lock, with the run's own description (client host, pid,
    command) from the lease when the toolkit's schema has one."""
    lease = conn.execute(sa.text("SELECT to_regclass('toolkit.runner_lease') IS NOT NULL")).scalar_one()
    holder = "(SELECT r.holder FROM toolkit.runner_lease r WHERE r.holder_pid = a.pid)" if lease else "NULL"
    rows = conn.execute(sa.text(f"""
        SELECT a.pid, a.application_name, a.usename, a.client_addr::text, a.backend_start,
               {holder} AS run
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.classid = :c AND l.objid = :o AND l.objsubid = 2
          AND l.granted AND l.pid <> pg_backend_pid()
    """), {"c": RUNNER_LOCK_KEYS[0], "o": RUNNER_LOCK_KEYS[1]})
    return [dict(r._mapping) for r in rows]


def describe_runner(holder: dict[str, Any]) -> str:
    """Who holds the runner lock, as an operator can find and stop it."""
    who = holder.get("run") or holder.get("application_name") or "a session without a name"
    return (f"{who}, connected as {holder.get('usename')} since {shown(holder['backend_start'])}"
            f" (its server pid {holder['pid']})")


def stop_hint(holders: list[dict[str, Any]]) -> str:
    server_pid = holders[0]["pid"] if holders else "PID"
    return ("wait for it to finish (`toolkit history` shows it), or stop it: Ctrl-C in its terminal "
            "(or kill -INT its pid on its host); from the database, "
            f"`SELECT pg_terminate_backend({server_pid})` ends its lock session and it stops before "
            "its next commit, resumable. Never kill the server process itself, and never run two at once")


def table_lock_holders(conn: Connection, tables: tuple[str, ...], *,
                       readers: bool = False) -> list[dict[str, Any]]:
    """Sessions (other than ours) holding a lock on any of ``tables``, oldest first; with
    ``readers``, those that only read it too (they block a schema change's ACCESS EXCLUSIVE)."""
    if not tables:
        return []
    rows = conn.execute(sa.text("""
        SELECT DISTINCT a.pid, a.application_name, a.usename, l.mode, c.relname AS table_name,
               a.xact_start, left(a.query, 200) AS query
        FROM pg_locks l
        JOIN pg_class c ON c.oid = l.relation
        JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE c.relname = ANY(:tables) AND l.granted AND a.pid <> pg_backend_pid()
          AND (l.mode IN ('AccessExclusiveLock', 'ExclusiveLock', 'ShareRowExclusiveLock',
                         'ShareLock', 'ShareUpdateExclusiveLock', 'RowExclusiveLock')
               OR (:readers AND l.mode IN ('AccessShareLock', 'RowShareLock')))
        ORDER BY a.xact_start NULLS LAST
    """), {"tables": list(tables), "readers": readers})
    return [dict(r._mapping) for r in rows]


def snapshot_holders(conn: Connection) -> list[dict[str, Any]]:
    """Sessions of this database (other than ours) holding a snapshot, oldest first.

    CREATE INDEX CONCURRENTLY (and DROP INDEX CONCURRENTLY) waits, as a ``virtualxid`` lock,
    for every transaction whose snapshot is older than its own: a lock timeout there names
    no table lock, only these. ``age_s`` is how long the transaction has been open."""
    rows = conn.execute(sa.text("""
        SELECT a.pid, a.application_name, a.usename, a.state, a.xact_start,
               extract(epoch FROM clock_timestamp() - a.xact_start)::float AS age_s,
               left(a.query, 200) AS query
        FROM pg_stat_activity a
        WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
          AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
          AND a.backend_type = 'client backend'
        ORDER BY a.xact_start NULLS LAST
    """))
    return [dict(r._mapping) for r in rows]


def describe_snapshot(holder: dict[str, Any]) -> str:
    app = holder.get("application_name") or "no application_name"
    age = holder.get("age_s")
    open_for = f"open for {age:.0f} s" if age is not None else "open"
    return (f"an old snapshot: pid {holder['pid']} ({app}, user {holder.get('usename')}), "
            f"{holder.get('state')}, its transaction {open_for} since {shown(holder.get('xact_start'))}")


def describe_holder(holder: dict[str, Any]) -> str:
    since = holder.get("xact_start") or holder.get("backend_start")
    app = holder.get("application_name") or "no application_name"
    what = f" {holder['mode']} on {holder['table_name']}" if holder.get("mode") else ""
    return f"pid {holder['pid']} ({app}, user {holder.get('usename')}){what} since {shown(since)}"


@dataclass
class RunnerLock:
    """The one-runner-at-a-time lock; use as a context manager."""

    engine: Engine
    label: str
    wait_s: float = 10.0
    poll_s: float = 0.5
    events: Events = LOGGED
    backend_pid: int | None = None
    _conn: Connection | None = None

    def __enter__(self) -> RunnerLock:
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(sa.text("SELECT set_config('application_name', :n, false), "
                             "set_config('idle_session_timeout', '0', false)"), {"n": self.label[:63]})
        conn.info[SESSION_NAME_KEY] = self.label[:63]  # named again when the pool hands it on
        deadline = time.monotonic() + self.wait_s
        waited = False
        while True:
            got, pid = conn.execute(sa.text("SELECT pg_try_advisory_lock(:c, :o), pg_backend_pid()"),
                                    {"c": RUNNER_LOCK_KEYS[0], "o": RUNNER_LOCK_KEYS[1]}).one()
            if got:
                self._conn, self.backend_pid = conn, pid
                return self
            holders = runner_lock_holders(conn)
            who = "; ".join(describe_runner(h) for h in holders) or "a session that just ended"
            if time.monotonic() >= deadline:
                conn.close()
                raise RunnerBusy(f"Another toolkit run holds the runner lock: {who}",
                                      stop_hint(holders), details={"holders": holders})
            if not waited:
                self.events.warn(f"the runner lock is held by {who}; waiting up to {self.wait_s:g} s "
                         "(--lock-wait)")
                waited = True
            time.sleep(self.poll_s)

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:c, :o)"),
                                   {"c": RUNNER_LOCK_KEYS[0], "o": RUNNER_LOCK_KEYS[1]})
            except DBAPIError:
                pass  # the session is gone, and the lock went with it
            finally:
                self._conn.close()
                self._conn = None
