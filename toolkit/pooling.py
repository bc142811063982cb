"""Refusing a transaction- or statement-pooling connection (PgBouncer) before any write.

A run needs one server session for its whole life: the runner lock is a session-level
advisory lock, and a pooler that hands each transaction to whichever server connection is
free would orphan that lock on a backend GitLab's own clients then receive. No setting of
PgBouncer is visible to a client, so the toolkit asks the only question that tells: do two
client sessions, each running a few short transactions one after the other, each keep one
server backend of their own? Directly or through session pooling they always do (a live
session's backend belongs to it alone). Through transaction or statement pooling a
backend goes back to the pool after every transaction and is handed on: PgBouncer reuses
the most recently released one (so the second session gets the first one's backend at
once), and with ``server_round_robin`` the backends rotate (so a session's backend
changes). The probe's transactions never overlap, so it needs no more than one server
connection in transaction mode, and two sessions (as any run does) in session mode.

Statement pooling also refuses a transaction block outright ("transaction blocks not
allowed in statement pooling mode"); :func:`pooler_refusal` turns that error, wherever it
surfaces, into the same refusal. The probe itself runs in autocommit, so it sees statement
pooling by the backends it is handed as well.
"""

from __future__ import annotations

from contextlib import ExitStack

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.errors import PreconditionRefused

# Which session runs each probe transaction, in order. Two in a row on one session, and
# alternating otherwise, so neither LIFO reuse nor a round robin over any number of idle
# backends can give each session one constant backend of its own.
PATTERN = (0, 1, 1, 0, 0, 1, 0, 1)
# What PgBouncer says when a client in statement pooling mode opens a transaction block.
STATEMENT_POOLING_ERRORS = ("statement pooling mode",)


def refuse_transaction_pooling(engine: Engine) -> None:
    """Raise :class:`PreconditionRefused` when the connection goes through a pooler that
    does not keep one server session per client session. Writes nothing."""
    seen: tuple[set[int], set[int]] = (set(), set())
    try:
        with ExitStack() as stack:
            sessions = [stack.enter_context(_autocommit(engine)) for _ in range(2)]
            for which in PATTERN:
                seen[which].add(sessions[which].execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    except DBAPIError as exc:
        if (refusal := pooler_refusal(exc)) is not None:
            raise refusal from exc
        raise
    if len(seen[0]) != 1 or len(seen[1]) != 1 or seen[0] & seen[1]:
        raise _refusal(f"two client sessions were handed server backends {_pids(seen[0])} "
                       f"and {_pids(seen[1])}")


def _autocommit(engine: Engine) -> Connection:
    # Autocommit: every statement is a transaction of its own, as a pooler sees it, and a
    # statement pooler does not refuse the probe before it has answered.
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def _pids(pids: set[int]) -> str:
    return "/".join(str(p) for p in sorted(pids))


def pooler_refusal(exc: BaseException) -> PreconditionRefused | None:
    """The refusal for an error only a statement-pooling PgBouncer raises; None otherwise.

    PgBouncer reports it as a protocol violation and closes the connection, which would
    otherwise read as a lost session (and a run to resume)."""
    text = str(getattr(exc, "orig", None) or exc)
    if any(marker in text for marker in STATEMENT_POOLING_ERRORS):
        return _refusal("PgBouncer refused a transaction block (statement pooling mode)")
    return None


def _refusal(evidence: str) -> PreconditionRefused:
    return PreconditionRefused(
        "The connection goes through PgBouncer (or another pooler) in transaction or statement "
        f"pooling mode: {evidence}. A run needs one server session of its own for its runner "
        "lock; nothing was written",
        "connect directly to PostgreSQL (GitLab's documentation says database migrations must "
        "bypass PgBouncer), or through a PgBouncer database entry with pool_mode=session",
        details={"pooler": "transaction or statement pooling"})
