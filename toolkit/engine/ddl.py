"""Schema changes: one Alembic revision per DDL step, run under lock_timeout with retries.

A DDL step's forward action upgrades to its revision, its backward action downgrades to
the revision's parent, and ``toolkit sql`` prints Alembic's offline rendering of the same
revision: one definition, as with data passes. Transactional DDL runs in Alembic's
per-revision transaction. CREATE INDEX CONCURRENTLY runs in an autocommit block inside
the revision, which first drops an INVALID index left by an interrupted build.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import cast

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.db import TIMEOUTS_OPTION
from toolkit.engine.actions import Action, ActionRun
from toolkit.engine.batches import pause, sqlstate
from toolkit.engine.budget import Budget
from toolkit.engine.events import emit
from toolkit.engine.locks import (
    TRANSIENT_STATES,
    describe_holder,
    describe_snapshot,
    snapshot_holders,
    table_lock_holders,
)
from toolkit.engine.results import Check, PassResult, StepPlan
from toolkit.engine.settings import RunOptions
from toolkit.engine.step import Step
from toolkit.errors import LockUnavailable
from toolkit.schema import migrations

GITLAB_BASE = "gitlab@base"


_VERSION_TABLE_DDL = re.compile(r"CREATE TABLE toolkit\.alembic_version \(.*?\);\n\n", re.S)


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(migrations.alembic_config())


def parent_of(revision: str) -> str:
    down = _script().get_revision(revision).down_revision
    return down if isinstance(down, str) else GITLAB_BASE


class SchemaChange:
    """An action that is one schema change, run by :func:`run_ddl` (lock_timeout, retries).

    Subclasses say what the change is (:meth:`apply`) and how to tell it is in place.
    """

    name: str
    description: str
    tables: tuple[str, ...]
    in_batches = False
    reduces_to_sql = True
    outcome: str | None = None  # a check or record says what it found, not "schema change"

    def is_done(self, conn: Connection) -> bool:
        raise NotImplementedError

    def render_sql(self, conn: Connection | None = None) -> str:
        raise NotImplementedError

    def how_it_runs(self) -> str:
        return "Schema change (direct DDL); retried after a lock timeout."

    def apply(self, conn: Connection) -> None:
        raise NotImplementedError

    def execute(self, run: ActionRun) -> PassResult:
        budget = run.budget
        budget.steer()
        if budget.throttle is not None and not budget.exhausted_reason():
            budget.throttle.wait(self.tables, self.name)
        if reason := budget.exhausted_reason():
            return PassResult(self.name, stopped=reason)
        changed = run_ddl(run.engine, self, run.options, budget, run.check_hold)
        if changed is None:
            return PassResult(self.name, stopped=budget.exhausted_reason() or "interrupted")
        return PassResult(self.name, complete=True, schema_change=self.outcome is None,
                          changed=changed, outcome=self.outcome)


@dataclass(frozen=True)
class Revision(SchemaChange):
    """Apply (``up``) or undo (``down``) one revision of the ``gitlab`` Alembic branch."""

    name: str
    description: str
    revision: str
    up: bool = True
    tables: tuple[str, ...] = ()  # whose lock holders to name if a lock cannot be had

    def is_done(self, conn: Connection) -> bool:
        return is_applied(conn, self.revision) == self.up

    def how_it_runs(self) -> str:
        return f"Schema change (Alembic revision {self.revision}); retried after a lock timeout."

    def render_sql(self, conn: Connection | None = None) -> str:
        """Alembic's offline rendering of this one revision, up or down."""
        config = migrations.alembic_config()
        config.output_buffer = buffer = io.StringIO()
        if self.up:
            # Offline mode cannot start from "gitlab@base"; plain "base" means the same here.
            start = parent_of(self.revision).replace(GITLAB_BASE, "base")
            command.upgrade(config, f"{start}:{self.revision}", sql=True)
        else:
            command.downgrade(config, f"{self.revision}:{parent_of(self.revision)}", sql=True)
        # Offline mode assumes an empty database and creates the version table; on a real run
        # the toolkit's own branch has created it already, so that statement never runs.
        return _VERSION_TABLE_DDL.sub("", buffer.getvalue()).strip()

    def apply(self, conn: Connection) -> None:
        if self.up:
            migrations.upgrade(conn, self.revision)
        else:
            migrations.downgrade(conn, parent_of(self.revision))


def _run_statements(conn: Connection, statements: list[str], transactional: bool) -> None:
    """In one transaction, or (CREATE INDEX CONCURRENTLY) each statement on its own."""
    if transactional:
        for statement in statements:
            conn.execute(sa.text(statement))
        conn.commit()
        return
    conn.commit()
    autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
    for statement in statements:
        autocommit.exec_driver_sql(statement)


def _as_script(statements: list[str] | tuple[str, ...], transactional: bool) -> str:
    body = ";\n".join(statements) + ";"
    return f"BEGIN;\n{body}\nCOMMIT;" if transactional else body


@dataclass(frozen=True)
class Statements(SchemaChange):
    """DDL given as statements. ``done_sql`` returns true once the change is in place, which
    makes it safe to run again after a crash. ``transactional=False``: each statement runs
    on its own (CREATE INDEX CONCURRENTLY)."""

    name: str
    description: str
    done_sql: str
    statements: tuple[str, ...]
    transactional: bool = True
    tables: tuple[str, ...] = ()

    def is_done(self, conn: Connection) -> bool:
        return bool(conn.execute(sa.text(self.done_sql)).scalar())

    def render_sql(self, conn: Connection | None = None) -> str:
        return _as_script(self.statements, self.transactional)

    def apply(self, conn: Connection) -> None:
        _run_statements(conn, list(self.statements), self.transactional)


@dataclass(frozen=True)
class StoredStatements(SchemaChange):
    """DDL read from the database at run time (milestone 4's rollback replays the DDL it
    recorded from the catalog, which no file can hold). ``source_sql`` is the query that
    yields them; :meth:`render_sql` with a connection shows them as they will run."""

    name: str
    description: str
    done_sql: str
    read: Callable[[Connection], list[str]] = field(compare=False)
    source_sql: str = ""
    transactional: bool = True
    tables: tuple[str, ...] = ()

    def is_done(self, conn: Connection) -> bool:
        return bool(conn.execute(sa.text(self.done_sql)).scalar())

    def render_sql(self, conn: Connection | None = None) -> str:
        statements = self.read(conn) if conn is not None else []
        if statements:
            return _as_script(statements, self.transactional)
        where = "none recorded in this database yet; " if conn is not None else ""
        return (f"-- statements recorded in the database ({where}read at run time by):\n"
                + "\n".join(f"--   {line}" for line in self.source_sql.strip().splitlines()))

    def apply(self, conn: Connection) -> None:
        _run_statements(conn, self.read(conn), self.transactional)


@dataclass(frozen=True)
class PythonBody(SchemaChange):
    """A change in Python (recording the catalog's DDL, comparing the archive): it has no
    SQL of its own to show, and says so (Django's ``reduces_to_sql = False``)."""

    name: str
    description: str
    done_sql: str
    body: Callable[[Connection], None] = field(compare=False)
    outcome: str | None = None
    tables: tuple[str, ...] = ()
    reduces_to_sql = False

    def is_done(self, conn: Connection) -> bool:
        return bool(conn.execute(sa.text(self.done_sql)).scalar())

    def render_sql(self, conn: Connection | None = None) -> str:
        return f"-- {self.description} (done by the toolkit in Python, see docs/blueprint.md)"

    def how_it_runs(self) -> str:
        return ("Schema change step done by the toolkit in Python (no SQL of its own to show), "
                "under the same timeouts and retries; safe to run again.")

    def apply(self, conn: Connection) -> None:
        self.body(conn)
        conn.commit()


def is_applied(conn: Connection, revision: str) -> bool:
    """True when ``revision`` is at or below a head recorded in the version table."""
    script = _script()
    return any(
        revision in {r.revision for r in script.iterate_revisions(head, "base")}
        for head in migrations.applied_revisions(conn)
    )


def run_ddl(engine: Engine, action: SchemaChange, options: RunOptions,
            budget: Budget, check_hold: Callable[[Connection], None] | None = None) -> bool | None:
    """Apply one DDL action with retries; False when it was already done, None when a stop
    (Ctrl-C, SIGTERM) came first: the change is not in place, and nothing of it is kept.

    ``check_hold`` (the run's lease) is called right before the change: its transactional
    statements are fenced at commit anyway, but CREATE INDEX CONCURRENTLY commits by itself
    (and the next run terminates it if this process dies while it waits: lease.py).
    A stop while the change waits on the server cancels it there (engine/signals.py).
    """
    timeouts = (options.ddl_lock_timeout_ms, options.statement_timeout_ms)

    def attempted(attempt: int, began: float, result: str, **more: object) -> None:
        emit(budget.events, "schema_change", pass_name=action.name, attempt=attempt + 1,
             result=result, ms=round((time.perf_counter() - began) * 1000, 3), **more)

    for attempt in range(options.ddl_retries + 1):
        if budget.stop_requested:
            return None
        with engine.connect() as conn:
            conn = conn.execution_options(**{TIMEOUTS_OPTION: timeouts})
            if action.is_done(conn):
                return False
            conn.rollback()
            began = time.perf_counter()
            try:
                if check_hold is not None:
                    check_hold(conn)
                    conn.commit()
                with session_timeouts(conn, *timeouts):
                    action.apply(conn)
                    conn.commit()
                attempted(attempt, began, "applied")
                return True
            except DBAPIError as exc:
                conn.rollback()
                code = sqlstate(exc)
                attempted(attempt, began, "retry" if code in TRANSIENT_STATES else "failed",
                          sqlstate=code)
                if code not in TRANSIENT_STATES:
                    raise
                if budget.stop_requested:
                    return None
                if attempt == options.ddl_retries:
                    raise _gave_up(conn, action, code, attempt + 1, options) from exc
                delay = min(options.backoff_s * 2 ** attempt, options.ddl_backoff_max_s)
                budget.events.warn(f"{action.name}: {TRANSIENT_STATES[code]}; rolled back, retry "
                                   f"{attempt + 1}/{options.ddl_retries} in {delay:.1f}s")
                pause(delay, budget)
    raise AssertionError("unreachable")


def _gave_up(conn: Connection, action: SchemaChange, code: str | None, tries: int,
             options: RunOptions) -> LockUnavailable:
    """What a schema change waited for, named: the sessions holding locks on its tables, and
    (CREATE INDEX CONCURRENTLY waits for them as ``virtualxid`` locks) old snapshots."""
    holders = table_lock_holders(conn, action.tables, readers=True)
    named = {h['pid'] for h in holders}
    snapshots = [h for h in snapshot_holders(conn) if h['pid'] not in named]
    conn.rollback()
    said = [describe_holder(h) for h in holders[:3]] + [describe_snapshot(h) for h in snapshots[:3]]
    who = "; ".join(said) or "none visible now"
    what = TRANSIENT_STATES.get(code or "", "a timeout")
    option = ("--statement-timeout-ms" if code == "57014" else "--ddl-lock-timeout-ms")
    limit = options.statement_timeout_ms if code == "57014" else options.ddl_lock_timeout_ms
    return LockUnavailable(
        f"{action.name}: {what} in {tries} tries ({option} {limit} each); the change was "
        f"rolled back. Waiting for: {who}",
        "find out why that session holds its lock or its snapshot (or end it), then run the same "
        f"command again; {option} raises the wait per try, --ddl-retries the tries",
        details={"holders": holders, "snapshots": snapshots},
    )


@contextmanager
def session_timeouts(conn: Connection, lock_ms: int, statement_ms: int) -> Iterator[None]:
    """Timeouts for statements that run outside any transaction (CREATE INDEX CONCURRENTLY
    in an Alembic autocommit block), where a per-transaction setting cannot reach: set for
    the session, and reset as soon as the change is over, so none outlives it."""
    conn.execute(sa.text("SELECT set_config('lock_timeout', :l, false), "
                         "set_config('statement_timeout', :s, false)"),
                 {"l": f"{lock_ms}ms", "s": f"{statement_ms}ms"})
    conn.commit()
    try:
        yield
    finally:
        with suppress(DBAPIError, psycopg.Error):  # a session that is gone took them with it
            conn.rollback()
            # Straight on the driver's connection: resetting the session's own settings is
            # no write of the run's, so it needs neither the lease nor a fenced commit.
            raw = cast(psycopg.Connection, conn.connection.dbapi_connection)
            with raw.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
                cursor.execute("RESET statement_timeout")
            raw.commit()


class SchemaStep(Step):
    """A step that is one Alembic revision on the ``gitlab`` branch."""

    revision: str = ""
    tables: tuple[str, ...] = ()
    unit = "schema changes"

    def forward(self) -> list[Action]:
        return [Revision(self.name, self.description, self.revision, True, self.tables)]

    def backward(self) -> list[Action]:
        return [Revision(f"{self.name}:revert", f"undo: {self.description}", self.revision, False,
                         self.tables)]

    def plan(self, conn: Connection) -> StepPlan:
        applied = is_applied(conn, self.revision)
        return StepPlan(
            step=self.name,
            description=self.description,
            rows=0,
            breakdown={},
            context={"schema change already applied": int(applied)},
            anomalies=[],
            sql=self.forward_sql(),
            kind="schema",
        )

    def remaining(self, conn: Connection) -> int:
        return 0 if is_applied(conn, self.revision) else 1

    def verify(self, conn: Connection) -> list[Check]:
        return []
