"""The exclusive right to run: an advisory lock to get in, a fenced lease to commit.

The advisory lock alone is not enough on a production server: it lives on an idle
session that a DBA may terminate, ``idle_session_timeout`` may reap, or a restart ends,
and nothing tells the run. A second run could then take the lock while the first goes
on writing. So a run that holds the advisory lock also *claims the lease*: it bumps the
fencing token in ``toolkit.runner_lease`` and records which backend holds the lock. From
then on every writing transaction of the run commits through the fenced commit
(engine/fenced.py), which first reads that row ``FOR SHARE`` (:meth:`Hold.seal`) and
refuses (:class:`HoldLost`, rolling the transaction back) unless the token is still the
run's own and that backend still holds the advisory lock.

Why that is airtight: the check holds a share lock on the lease row until the commit
completes, and a new run must *update* that row to claim the lease, so it cannot claim
it between another run's check and that run's commit. Once it has, the old token fails
every later check. Statements that run outside a transaction (CREATE INDEX
CONCURRENTLY) check the lease just before they start (:meth:`Hold.check`).

That check cannot reach a statement already on the server: a run killed (``kill -9``, a
crashed host) while CREATE INDEX CONCURRENTLY waits leaves its backend waiting, and it
would commit the index by itself after the lease moved on. So every session of a run
carries the run's token in its ``application_name`` (``toolkit run 12 token 7``), and a
run that has just claimed the lease terminates the backends of earlier tokens still at
work (its own role's, in this database) and names them before it goes on
(:meth:`Hold.end_orphans`): what a run that lost its hold left on the server ends there.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.db import APPLICATION_NAME, SESSION_NAME_KEY
from toolkit.engine import fenced, writes
from toolkit.engine.events import LOGGED, Events
from toolkit.engine.locks import RunnerLock
from toolkit.errors import RunnerBusy, SessionLost
from toolkit.schema.own import SCHEMA

# The lock's session holds the lock for as long as it lives (a run never unlocks it early),
# so "held" is "that backend, started then, is still there": one targeted look-up of one
# backend, where reading pg_locks would scan the whole lock table at every commit.
_CHECK = sa.text(f"""
    SELECT l.token, l.holder_pid, l.holder,
           EXISTS (SELECT 1 FROM pg_stat_get_activity(l.holder_pid) a
                   WHERE a.backend_start = l.holder_started) AS held
    FROM {SCHEMA}.runner_lease l WHERE l.id = 1 FOR SHARE OF l
""")


# PostgreSQL keeps the first NAMEDATALEN - 1 bytes of an application_name.
NAME_MAX = 63
# Backends of earlier runs still at work: named by a token older than this run's, this
# role's, in this database, and not idle (an idle session of a killed client ends by itself).
_ORPHANS = sa.text("""
    SELECT pid, application_name, state, wait_event_type, wait_event, left(query, 200) AS query,
           extract(epoch FROM clock_timestamp() - coalesce(query_start, backend_start))::float AS seconds
    FROM pg_stat_activity
    WHERE datname = current_database() AND usename = current_user AND pid <> pg_backend_pid()
      AND state IS DISTINCT FROM 'idle'
      AND substring(application_name FROM ' token ([0-9]{1,18})$')::bigint < :token
    ORDER BY pid
""")


# The name each engine's sessions should carry now, kept per engine (see name_sessions).
_WANTED: WeakKeyDictionary[Engine, list[str | None]] = WeakKeyDictionary()


def name_sessions(engine: Engine, name: str | None) -> None:
    """From now on every session ``engine`` hands out is named ``name`` (None: as the engine
    names it, without a token). Set on checkout, by the session's own ``set_config`` only when
    it is named otherwise, and committed on the driver's connection: a name is no write of
    the run's, so it needs no fence. PgBouncer tracks application_name like the client's own."""
    if engine in _WANTED:
        _WANTED[engine][0] = name
        return
    wanted: list[str | None] = [name]
    _WANTED[engine] = wanted

    @event.listens_for(engine, "checkout")
    def _named(dbapi: Any, record: Any, proxy: Any) -> None:
        name = wanted[0] or _default_name(engine)
        if record.info.get(SESSION_NAME_KEY, _default_name(engine)) == name:
            return
        with dbapi.cursor() as cursor:
            cursor.execute("SELECT set_config('application_name', %s, false)", (name,))
        dbapi.commit()
        record.info[SESSION_NAME_KEY] = name


def _default_name(engine: Engine) -> str:
    base = engine.url.query.get("application_name") or APPLICATION_NAME
    return base if isinstance(base, str) else base[0]


class HoldLost(SessionLost):
    """The run no longer holds the runner lock: it commits nothing more. ``taken_over``:
    another run holds it now (resuming by itself would fight that run, so it does not)."""

    def __init__(self, problem: str, next_step: str | None = None, *, taken_over: bool = False,
                 details: object = None):
        super().__init__(problem, next_step, details=details)
        self.taken_over = taken_over


def describe_self(label: str) -> str:
    """Who this run is, as another run (or a DBA) needs to find it."""
    return f"{label} (pid {os.getpid()} on {socket.gethostname()})"


@dataclass
class Hold:
    """Use as a context manager around a run; :meth:`claim` once the own tables exist."""

    engine: Engine
    label: str
    wait_s: float = 10.0
    events: Events = LOGGED
    token: int | None = None
    run_id: int | None = None  # the run whose writes each commit records (None: not counted)
    lock_pid: int | None = None
    commits_checked: int = 0
    _lock: RunnerLock | None = field(default=None, repr=False)

    def __enter__(self) -> Hold:
        self._lock = RunnerLock(self.engine, self.label, self.wait_s, events=self.events).__enter__()
        self.lock_pid = self._lock.backend_pid
        return self

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            fenced.unfence(self.engine)
            self.token = None
        name_sessions(self.engine, None)
        if self._lock is not None:
            self._lock.__exit__(*exc)
            self._lock = None

    def claim(self, conn: Connection, run_id: int | None = None) -> int:
        """Take the lease (after any earlier holder's last commit), fence every commit, name
        the run's sessions by its token, and end what earlier tokens left on the server."""
        self.token = conn.execute(sa.text(f"""
            UPDATE {SCHEMA}.runner_lease SET token = token + 1, holder_pid = :pid, holder = :who,
                   holder_started = (SELECT backend_start FROM pg_stat_get_activity(:pid)),
                   run_id = :run, acquired_at = clock_timestamp()
            WHERE id = 1 RETURNING token
        """), {"pid": self.lock_pid, "who": describe_self(self.label), "run": run_id}).scalar_one()
        conn.commit()  # not yet fenced: the fence comes next
        fenced.fence(self.engine, self)
        self._name_sessions(run_id)
        self.end_orphans(conn)
        return self.token

    def record_run(self, conn: Connection, run_id: int) -> None:
        """From now on every commit also records the rows it wrote (engine/writes.py)."""
        conn.execute(sa.text(f"UPDATE {SCHEMA}.runner_lease SET run_id = :r WHERE id = 1"), {"r": run_id})
        self.run_id = run_id if writes.start(conn, run_id) else None
        self._name_sessions(run_id)

    # -- the run's sessions, by name -----------------------------------------------------
    def session_name(self, run_id: int | None = None) -> str:
        """``toolkit run 12 token 7``: the prefix (``toolkit``, or the URL's own
        application_name) first, so pg_stat_activity filters on it still work."""
        base = _default_name(self.engine)
        suffix = (f" run {run_id}" if run_id is not None else "") + f" token {self.token}"
        return base[:NAME_MAX - len(suffix)] + suffix

    def _name_sessions(self, run_id: int | None) -> None:
        """Every session the engine hands out from now on carries the token."""
        name_sessions(self.engine, self.session_name(run_id))

    def end_orphans(self, conn: Connection) -> list[dict[str, Any]]:
        """Terminate the backends of earlier tokens still at work (this role's, in this
        database), name them in one line, and return them. They belong to runs that lost
        their hold (killed, or their lock session ended): a statement of theirs already on
        the server (CREATE INDEX CONCURRENTLY waiting for an old snapshot, a batch) would
        otherwise go on, and commit, after this run took over."""
        orphans = [dict(r._mapping) for r in conn.execute(_ORPHANS, {"token": self.token})]
        if not orphans:
            conn.rollback()
            return []
        two_args = conn.execute(sa.text("SELECT current_setting('server_version_num')::int >= 140000")
                                ).scalar_one()
        terminate = ("SELECT pg_terminate_backend(:pid, 5000)" if two_args
                     else "SELECT pg_terminate_backend(:pid)")
        for orphan in orphans:
            try:
                orphan["terminated"] = bool(conn.execute(sa.text(terminate),
                                                         {"pid": orphan["pid"]}).scalar())
            except DBAPIError:  # it ended by itself in between, or would not in 5 s
                conn.rollback()
                orphan["terminated"] = False
        conn.rollback()
        said = "; ".join(
            f"pid {o['pid']} ({o['application_name']}, {o['state']} for {o['seconds'] or 0:.0f} s"
            + (f", waiting for {o['wait_event_type']} {o['wait_event']}" if o["wait_event_type"] else "")
            + f": {' '.join((o['query'] or '').split())[:80]})"
            for o in orphans)
        if left := [o for o in orphans if not o["terminated"]]:
            raise RunnerBusy(
                f"A session of an earlier run is still at work on the server and did not end when "
                f"terminated: {said}",
                f"end it (`SELECT pg_terminate_backend({left[0]['pid']})` as a superuser, or wait for "
                "it), then run the same command again; nothing of this run was written",
                details={"orphans": orphans})
        self.events.warn(f"terminated {len(orphans)} session(s) of earlier runs still at work on the "
                         f"server, so nothing of theirs commits after this run took over: {said}")
        return orphans

    def check(self, conn: Connection) -> None:
        """Raise :class:`HoldLost` unless this run still holds the lease; inside a
        transaction the row stays share-locked until it ends."""
        row = conn.execute(_CHECK).one()
        self.commits_checked += 1
        if row.token != self.token:
            raise HoldLost(
                f"This run lost the runner lock: another run took it over ({row.holder}); "
                "nothing more of this run was committed",
                "see `toolkit history` for both runs; when the other one has finished, run the "
                "same command again if it is still needed",
                taken_over=True, details={"holder": row.holder, "token": row.token, "ours": self.token})
        if not row.held:
            raise HoldLost(
                f"This run lost the runner lock: its lock session (server pid {self.lock_pid}) "
                "ended (terminated by a DBA, idle_session_timeout, or a server restart); nothing "
                "more of this run was committed",
                "everything committed before is kept; run the same command again to resume, or "
                "add --reconnect N to let it resume by itself")

    def seal(self, conn: Connection) -> None:
        """What every writing transaction of the run does just before its commit
        (engine/fenced.py): check the lease, then record the rows it wrote."""
        self.check(conn)
        if self.run_id is not None:
            writes.record(conn, self.run_id)
