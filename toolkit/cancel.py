"""The statements the toolkit has on the server right now, so a stop can cancel them.

A Ctrl-C or SIGTERM must act within a second, whatever the run is waiting for on the
server: a lock for a schema change, CREATE INDEX CONCURRENTLY waiting for an old snapshot,
a long batch. Python runs a signal handler between the driver's polls, but the statement
goes on waiting on the server. So, as psql does on Ctrl-C, the stop sends PostgreSQL a
cancel request (libpq's, through psycopg's ``cancel_safe``) for the toolkit's own
statement, and the statement ends with ``QueryCanceled``, an ordinary error.

That error is then turned into :class:`StatementCancelled` (see :func:`track`), which
every layer passes on untouched and the run's history records as ``interrupted``: an
exception of its own rather than a ``KeyboardInterrupt`` raised inside the driver, which
SQLAlchemy treats as an exit (it invalidates the connection) and which Alembic's
autocommit block then masks with a ``PendingRollbackError`` when it commits on it.

Only statements of the main thread are tracked: the run's work happens there, and the
throttle's or a server's reader threads are not the run's statements.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import Engine

CANCEL_TIMEOUT_S = 2.0


class StatementCancelled(Exception):
    """A statement of the run's that a stop (Ctrl-C, SIGTERM) cancelled on the server;
    the server rolled back its transaction (a CONCURRENTLY build leaves an INVALID index,
    which the next run drops and builds again)."""

    def __init__(self, statement: str):
        super().__init__(f"cancelled on the server: {statement}")
        self.statement = statement


@dataclass
class InFlight:
    """Statements on the server now, by driver connection, each with a sequence number so a
    delayed cancel never reaches a later statement on the same connection."""

    _active: dict[int, tuple[psycopg.Connection, int, str]] = field(default_factory=dict)
    _cancelled: set[tuple[int, int]] = field(default_factory=set)
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, dbapi: psycopg.Connection, statement: str) -> None:
        with self._lock:
            self._seq += 1
            self._active[id(dbapi)] = (dbapi, self._seq, statement)

    def finished(self, dbapi: psycopg.Connection) -> tuple[int, str] | None:
        """Forget the connection's statement; returns its (sequence, text) if there was one."""
        with self._lock:
            found = self._active.pop(id(dbapi), None)
        return (found[1], found[2]) if found else None

    def snapshot(self) -> list[tuple[int, int]]:
        """(connection, sequence) of every statement on the server now."""
        with self._lock:
            return [(key, seq) for key, (_, seq, _) in self._active.items()]

    def any(self) -> bool:
        with self._lock:
            return bool(self._active)

    def cancel(self, only: list[tuple[int, int]] | None = None) -> int:
        """Send a cancel request for each statement in flight (or only those of ``only``
        that are still the same statement); returns how many were sent."""
        with self._lock:
            targets = [(key, dbapi, seq) for key, (dbapi, seq, _) in self._active.items()
                       if only is None or (key, seq) in only]
            self._cancelled.update((key, seq) for key, _, seq in targets)
        sent = 0
        for _, dbapi, _ in targets:
            try:
                dbapi.cancel_safe(timeout=CANCEL_TIMEOUT_S)
                sent += 1
            except Exception:  # a connection that is gone has nothing to cancel
                pass
        return sent

    def was_cancelled(self, dbapi: psycopg.Connection, seq: int) -> bool:
        with self._lock:
            return (id(dbapi), seq) in self._cancelled


IN_FLIGHT = InFlight()


def track(engine: Engine) -> None:
    """Record the main thread's statements on ``engine`` in :data:`IN_FLIGHT`, and turn a
    ``QueryCanceled`` that a stop caused into :class:`StatementCancelled`."""

    def _dbapi(cursor: Any) -> psycopg.Connection | None:
        return getattr(cursor, "connection", None)

    @event.listens_for(engine, "before_cursor_execute")
    def _started(conn, cursor, statement, parameters, context, executemany) -> None:
        if threading.current_thread() is threading.main_thread() and (dbapi := _dbapi(cursor)):
            IN_FLIGHT.started(dbapi, statement)

    @event.listens_for(engine, "after_cursor_execute")
    def _finished(conn, cursor, statement, parameters, context, executemany) -> None:
        if threading.current_thread() is threading.main_thread() and (dbapi := _dbapi(cursor)):
            IN_FLIGHT.finished(dbapi)

    @event.listens_for(engine, "handle_error")
    def _failed(context: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        dbapi = _dbapi(getattr(context.execution_context, "cursor", None))
        if dbapi is None:
            return
        done = IN_FLIGHT.finished(dbapi)
        if (done is not None and isinstance(context.original_exception, psycopg.errors.QueryCanceled)
                and IN_FLIGHT.was_cancelled(dbapi, done[0])):
            text = " ".join(done[1].split())
            raise StatementCancelled(text if len(text) <= 80 else text[:77] + "...") \
                from context.original_exception


def stop_in_chain(exc: BaseException) -> BaseException | None:
    """The stop (KeyboardInterrupt, or a statement it cancelled) behind ``exc``, if any: an
    error raised while a stop unwound (a commit on the connection it invalidated) hides it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt | StatementCancelled):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
