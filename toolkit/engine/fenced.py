"""A fenced commit: the one way a run's writing transaction commits.

While a run holds the lease (lease.py), every transaction of its that writes ends here, so
at its call site it reads as what it does. A batch:

    with fenced.batch(conn, timeouts=(lock_ms, statement_ms)):  # BEGIN; SET LOCAL timeouts
        changed = ...                                          # the change
        state.save_checkpoint(conn, ...)                       # the checkpoint
    # leaving the block: the lease checked, the write record added, COMMIT

and any other writing transaction (a checkpoint's bookkeeping, the run's own rows, a
control request) ends with ``fenced.commit(conn)``: the same lease check and write record,
then the commit. Code that commits by itself, out of the engine's reach (Alembic's upgrade
of a schema change), runs inside ``with fenced.each_commit(conn):``, whose every commit is
sealed the same way.

Sealing a transaction (:meth:`Fence.seal`, the run's :class:`~toolkit.engine.lease.Hold`):
read the lease row ``FOR SHARE`` and refuse (``HoldLost``) unless the run still holds it,
the row then share-locked until the commit, so no other run can claim the lease in between;
then add the rows this transaction wrote to the run's record (writes.py), in the same
transaction. A seal that refuses leaves the transaction rolled back: nothing of it is kept.

The engine's ``commit`` hook is a safety net only (:func:`guard`): a commit on a fenced
engine that wrote something (the transaction has an id) without being sealed here is
still refused when the run lost its hold (``HoldLost``), and otherwise fails loudly
(:class:`UnfencedCommit`); either way the transaction is rolled back, so a new write path
can neither commit around the lease nor go unnoticed. Commits that must not be fenced say so: the run's own
end row (``UNFENCED``, written even after the hold is lost) and read-only transactions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Protocol
from weakref import WeakKeyDictionary

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from toolkit.db import OWN_TIMEOUTS, set_timeouts

# A connection option: this commit writes only the run's own history row, which must be
# recorded even after the hold is lost (it says how the run ended).
UNFENCED = "toolkit_unfenced"
# Connection options (on the Connection, never its driver connection, which an error may
# have invalidated): the transaction about to commit was sealed here; every commit in the
# block is to be sealed (each_commit).
_SEALED = "toolkit_sealed"
_EACH_COMMIT = "toolkit_seal_each_commit"


def _flag(conn: Connection, name: str, value: bool) -> None:
    conn.execution_options(**{name: value})


def _flagged(conn: Connection, name: str) -> bool:
    return bool(conn.get_execution_options().get(name))


class Fence(Protocol):
    def seal(self, conn: Connection) -> None:
        """Raise unless the run still holds the lease; record the transaction's writes."""


class UnfencedCommit(RuntimeError):
    """A transaction wrote and committed on a fenced engine without going through this
    module: a bug in the toolkit, never something an operator caused."""


_FENCES: WeakKeyDictionary[Engine, Fence] = WeakKeyDictionary()


def fence(engine: Engine, by: Fence) -> None:
    """From now on, writing transactions on ``engine`` commit sealed by ``by``."""
    _FENCES[engine] = by
    if not event.contains(engine, "commit", guard):
        event.listen(engine, "commit", guard)


def unfence(engine: Engine) -> None:
    _FENCES.pop(engine, None)
    if event.contains(engine, "commit", guard):
        event.remove(engine, "commit", guard)


def _fence_of(conn: Connection) -> Fence | None:
    options: dict[str, Any] = conn.get_execution_options()
    if options.get(UNFENCED) or options.get("postgresql_readonly"):
        return None
    return _FENCES.get(conn.engine)


def _seal(conn: Connection) -> None:
    """Seal the transaction under way; when the seal refuses, it is rolled back first."""
    if (by := _fence_of(conn)) is not None:
        try:
            by.seal(conn)
        except BaseException:
            _roll_back(conn)
            raise


def _roll_back(conn: Connection) -> None:
    """Roll back on the driver's connection: inside a commit hook SQLAlchemy has already
    let go of the transaction, which the server still holds open (with its writes)."""
    if conn.invalidated or conn.closed:
        return  # a session that is gone took its transaction with it
    with suppress(Exception):
        conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]


def commit(conn: Connection) -> None:
    """Seal the transaction under way (the lease checked, its writes recorded), then commit.
    Without a lease on the engine (no run holds it: a read, a dry run), a plain commit."""
    _seal(conn)
    _flag(conn, _SEALED, True)
    try:
        conn.commit()
    finally:
        _flag(conn, _SEALED, False)


@contextmanager
def batch(conn: Connection, timeouts: tuple[int, int]) -> Iterator[Connection]:
    """One fenced batch: BEGIN and this transaction's own ``lock_timeout`` and
    ``statement_timeout`` (ms), the body (the change and its checkpoint), then the seal and
    COMMIT. An error anywhere rolls it all back."""
    _flag(conn, OWN_TIMEOUTS, True)  # db.py's begin hook leaves them to this transaction
    try:
        transaction = conn.begin()
    finally:
        _flag(conn, OWN_TIMEOUTS, False)
    try:
        # The transaction's own block: an error rolls it back, a connection the error
        # invalidated included (SQLAlchemy's rule for a transaction that is no longer valid).
        with transaction:
            set_timeouts(conn, *timeouts)
            yield conn
            _seal(conn)
            _flag(conn, _SEALED, True)
    finally:
        _flag(conn, _SEALED, False)


@contextmanager
def each_commit(conn: Connection) -> Iterator[Connection]:
    """For code that commits by itself (Alembic): every commit in the block is sealed."""
    _flag(conn, _EACH_COMMIT, True)
    try:
        yield conn
    finally:
        _flag(conn, _EACH_COMMIT, False)


def guard(conn: Connection) -> None:
    """The safety net (an engine ``commit`` hook). A commit that was not sealed here and
    wrote something is still fenced (a run that lost its hold commits nothing, however the
    write got there), and then refused, loudly; either way the transaction is rolled back
    here, and raising stops the commit."""
    if _flagged(conn, _SEALED) or _fence_of(conn) is None:
        return
    if _flagged(conn, _EACH_COMMIT):
        _seal(conn)
        return
    if conn.exec_driver_sql("SELECT txid_current_if_assigned() IS NOT NULL").scalar():
        _seal(conn)  # HoldLost first: the lease is never bypassed
        _roll_back(conn)
        raise UnfencedCommit(
            "a transaction that wrote was committed around the fenced commit (engine/fenced.py) "
            "while a run holds the lease; it was rolled back. This is a bug in the toolkit: "
            "commit writes with fenced.commit or fenced.batch")
