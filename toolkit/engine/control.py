"""Steering a running run from any host: pause, resume, abort, and set an option.

gh-ost takes interactive commands (``throttle``, ``chunk-size=``, ``panic``) on a socket of
the runner's host; GitLab pauses a batched background migration through the API. The one
thing every operator of a toolkit run can reach is the database, so a request is a row in
``toolkit.run_controls`` (revision 0010) and the running run reads it: at every batch
boundary and, while paused or waiting on the database's health, every half second. One
indexed read of the unapplied rows newer than the last it saw, in a short transaction of
its own; each request taken is marked with the moment and the run that took it, so the
table is also the run's control history.

The engine validates nothing a person typed: the CLI converts ``set KEY=VALUE`` with the
parameter type it builds for the option from the settings tree (``settings.py``), bounds
included, before it stores it; the run reads the key and the type from the same tree.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from toolkit.engine.events import emit
from toolkit.engine.locks import runner_lock_holders
from toolkit.engine.settings import SETTABLE, SIZING, RunOptions
from toolkit.engine.walrate import WalRate
from toolkit.schema.own import SCHEMA

if TYPE_CHECKING:
    from toolkit.engine.budget import Budget

TABLE = f"{SCHEMA}.run_controls"
ACTIONS = ("pause", "resume", "abort", "set", "unpostpone")
POLL_S = 0.5
SAY_EVERY_S = 60.0  # a paused run says so this often



def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def request(conn: Connection, action: str, key: str | None = None, value: str | None = None,
            reason: str | None = None, *, run_going: bool = True) -> dict[str, Any]:
    """Store one request; ``run_going`` False stores it already closed (nobody took it), so
    a later run never acts on a request made while it was not running."""
    row = conn.execute(sa.text(f"""
        INSERT INTO {TABLE} (action, key, value, reason, os_user, host, applied_at, note)
        VALUES (:action, :key, :value, :reason, :os_user, :host,
                CASE WHEN :going THEN NULL ELSE clock_timestamp() END,
                CASE WHEN :going THEN NULL ELSE 'no run was going' END)
        RETURNING id, database, db_user, requested_at"""),
        {"action": action, "key": key, "value": value, "reason": reason, "os_user": _os_user(),
         "host": socket.gethostname(), "going": run_going}).one()
    conn.commit()
    return dict(row._mapping)


def last_id(conn: Connection, run_id: int) -> int:
    """The newest request made before the run's history row: a run reads only what comes
    after it (one made while it took the lock and fingerprinted is its own), never what an
    earlier run left untaken."""
    return int(conn.execute(sa.text(f"""
        SELECT coalesce(max(id), 0) FROM {TABLE}
        WHERE requested_at < (SELECT started_at FROM {SCHEMA}.runs WHERE id = :run)"""),
        {"run": run_id}).scalar_one())


def paused_now(conn: Connection) -> dict[str, Any] | None:
    """The pause that holds a run now (who, when, why), if the last pause, resume or abort a
    running run took was a pause and a run holds the runner lock: what ``toolkit status``
    shows."""
    if not conn.execute(sa.text(f"SELECT to_regclass('{TABLE}') IS NOT NULL")).scalar_one():
        return None
    row = conn.execute(sa.text(f"""
        SELECT c.id, c.db_user, c.os_user, c.host, c.requested_at, c.applied_at, c.applied_by,
               c.reason, c.action
        FROM {TABLE} c JOIN {SCHEMA}.runs r ON r.id = c.applied_by
        WHERE c.action IN ('pause', 'resume', 'abort') AND r.outcome = 'running'
        ORDER BY c.id DESC LIMIT 1""")).one_or_none()
    if row is None or row.action != "pause" or not runner_lock_holders(conn):
        return None  # a run killed while paused is still marked running, but holds nothing
    return dict(row._mapping)


def taken_by(conn: Connection, run_id: int) -> list[dict[str, Any]]:
    """The requests a run took, oldest first: its control history."""
    return [dict(r._mapping) for r in conn.execute(sa.text(f"""
        SELECT id, action, key, value, reason, db_user, os_user, host, requested_at, applied_at
        FROM {TABLE} WHERE applied_by = :run ORDER BY id"""), {"run": run_id})]


def who(row: dict[str, Any]) -> str:
    return f"{row['db_user']} ({row['os_user']}@{row['host']})"


@dataclass
class Steering:
    """A run's side: reads the requests it has not taken and acts on them.

    ``options`` is the run's RunOptions (changed in place by ``set``, so every later batch
    and pass, and the throttle, whose limits they are, use the new value); ``budget`` the
    run's Budget (its events, its throttle)."""

    engine: Engine
    run_id: int
    options: RunOptions
    budget: Budget
    seen: int = 0
    paused: dict[str, Any] | None = None
    aborted: dict[str, Any] | None = None
    unpostponed: dict[str, Any] | None = None  # the unpostpone that ended a hold before drop
    resized: bool = False  # a set changed the batch sizing: the pass makes a new sizer
    taken: list[dict[str, Any]] = field(default_factory=list)
    _last_read: float = 0.0

    def start(self) -> None:
        with self.engine.connect() as conn:
            self.seen = last_id(conn, self.run_id)
            conn.rollback()

    def poll(self) -> None:
        """Take the requests newer than the last seen: one indexed read (and, only when
        there are some, one update marking them taken)."""
        self._last_read = time.monotonic()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(f"""
                SELECT id, action, key, value, reason, db_user, os_user, host, requested_at
                FROM {TABLE} WHERE applied_at IS NULL AND id > :seen ORDER BY id"""),
                {"seen": self.seen}).all()
            if not rows:
                conn.rollback()  # a read: no commit, which the lease would fence
                return
            conn.execute(sa.text(f"""
                UPDATE {TABLE} SET applied_at = clock_timestamp(), applied_by = :run
                WHERE id = ANY(:ids) AND applied_at IS NULL"""),
                {"run": self.run_id, "ids": [r.id for r in rows]})
            conn.commit()
        for r in rows:
            self.seen = max(self.seen, r.id)
            self._act(dict(r._mapping))

    def _act(self, row: dict[str, Any]) -> None:
        events = self.budget.events
        action = row["action"]
        by = who(row) + (f": {row['reason']}" if row["reason"] else "")
        fields = {"run_id": self.run_id, "action": action, "key": row["key"], "value": row["value"],
                  "reason": row["reason"], "db_user": row["db_user"], "os_user": row["os_user"],
                  "host": row["host"], "request_id": row["id"]}
        if action == "pause":
            self.paused = row
            events.warn(f"paused by {by}; holding the runner lock until `toolkit control resume`")
        elif action == "resume":
            if self.paused is not None:
                events.say(f"resumed by {by}")
            self.paused = None
        elif action == "abort":
            self.aborted = row
            events.warn(f"abort requested by {by}; stopping at this batch boundary")
        elif action == "unpostpone":
            self.unpostponed = row
            events.say(f"unpostponed by {by}")
        elif action == "set":
            key, value = row["key"], row["value"]
            if key not in SETTABLE:  # stored by a newer CLI: said, not acted on
                events.warn(f"control set {key}={value} by {by}: not an option this run can change")
                fields["ignored"] = True
            else:
                attr = SETTABLE[key].name
                before = getattr(self.options, attr)
                new = SETTABLE[key].spec.bound.parse(value)
                setattr(self.options, attr, new)  # the throttle's limits too: the same object
                throttle = self.budget.throttle
                if throttle is not None and attr == "max_wal_rate_mb_s":
                    # a new meter measures from its first read
                    if throttle.wal is None:
                        throttle.wal = WalRate(new)
                    else:
                        throttle.wal.limit_mb_s = new
                if key in SIZING:
                    self.resized = True
                fields["before"] = before
                events.say(f"{key} set to {value} (was {before}) by {by}")
        self.taken.append(fields)
        emit(events, "control", **fields)

    def due(self) -> bool:
        return time.monotonic() - self._last_read >= POLL_S

    def boundary(self) -> None:
        """At a batch boundary: take new requests, then wait while paused (holding the
        lease, which a pause never lets go), saying so every minute, until a resume, an
        abort, or a stop (Ctrl-C)."""
        self.poll()
        if self.paused is None:
            return
        began = last_said = time.monotonic()
        while self.paused is not None and self.aborted is None and not self.budget.stop_requested:
            _sleep(POLL_S, self.budget)
            self.poll()
            now = time.monotonic()
            if self.paused is not None and now - last_said >= SAY_EVERY_S:
                last_said = now
                self.budget.events.note(f"still paused by {who(self.paused)} "
                                        f"({now - began:.0f} s so far); `toolkit control resume` "
                                        "goes on")


HOLD_NOTE = "held before drop"


def held_now(conn: Connection) -> dict[str, Any] | None:
    """The hold before milestone 4's drops a running run is in now (since when, which run),
    if the last hold, unpostpone or abort it took was its own hold and a run holds the
    runner lock: what ``toolkit status`` shows."""
    if not conn.execute(sa.text(f"SELECT to_regclass('{TABLE}') IS NOT NULL")).scalar_one():
        return None
    row = conn.execute(sa.text(f"""
        SELECT c.action, c.applied_at, c.applied_by, c.reason
        FROM {TABLE} c JOIN {SCHEMA}.runs r ON r.id = c.applied_by
        WHERE c.action IN ('hold', 'unpostpone', 'abort') AND r.outcome = 'running'
        ORDER BY c.id DESC LIMIT 1""")).one_or_none()
    if row is None or row.action != "hold" or not runner_lock_holders(conn):
        return None
    return dict(row._mapping)


def hold(control: Steering, flag_file: str | None) -> bool:
    """Wait before the first drop until ``toolkit control unpostpone`` (or, with a flag
    file, until the file is gone): True to go on, False on an abort or a stop.

    Nothing GitLab needs is held meanwhile: each read is a short transaction of its own,
    closed at once; only the runner lease stays, as during a pause. The hold is recorded
    as a ``hold`` row of the control table (taken by this run) so ``toolkit status`` can
    say since when the run waits."""
    budget = control.budget
    events = budget.events
    control.poll()

    def waiting() -> bool:
        if flag_file is not None:
            return os.path.exists(flag_file) and control.unpostponed is None
        return control.unpostponed is None

    if control.aborted is not None or budget.stop_requested:
        return False
    if not waiting():
        return True
    with control.engine.connect() as conn:
        conn.execute(sa.text(f"""
            INSERT INTO {TABLE} (action, reason, os_user, host, applied_at, applied_by, note)
            VALUES ('hold', :reason, :os_user, :host, clock_timestamp(), :run, :note)"""),
            {"reason": f"flag file {flag_file}" if flag_file else "--hold-before-drop",
             "os_user": _os_user(), "host": socket.gethostname(), "run": control.run_id,
             "note": HOLD_NOTE})
        conn.commit()
    until = (f"{flag_file} is removed or `toolkit control unpostpone`" if flag_file
             else "`toolkit control unpostpone`")
    events.warn(f"held before drop: archived and checked row for row, nothing dropped; holding "
                f"the runner lock only (no transaction, no lock on GitLab's tables) until {until}")
    emit(events, "held", run_id=control.run_id, before="drop", flag_file=flag_file)
    began = last_said = time.monotonic()
    while waiting() and control.aborted is None and not budget.stop_requested:
        _sleep(POLL_S, budget)
        control.poll()
        now = time.monotonic()
        if waiting() and now - last_said >= SAY_EVERY_S:
            last_said = now
            events.note(f"still held before drop ({now - began:.0f} s so far); nothing dropped; "
                        f"{until} goes on")
    if control.aborted is not None or budget.stop_requested:
        return False
    if control.unpostponed is None:
        events.say(f"flag file {flag_file} removed: going on with the drops")
    return True


def _sleep(seconds: float, budget: Budget) -> None:
    from toolkit.engine.batches import pause  # batches imports this module
    pause(seconds, budget)
