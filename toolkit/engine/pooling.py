"""Refusing a transaction- or statement-pooling connection (PgBouncer) before any write.

A run needs one server session for its whole life: the runner lock is a session-level
advisory lock, and a pooler that hands each transaction to whichever server connection is
free would orphan that lock on a backend GitLab's own clients then receive. No setting of
PgBouncer is visible to a client, so the toolkit asks the only question that tells: does a
second client session ever land on the server backend the first one just used? Directly
or through session pooling, a live session's backend belongs to it alone, so never; in
transaction or statement pooling, the backend is returned to the pool after each
transaction and (PgBouncer reuses the most recently released one) is handed straight on.
"""

from __future__ import annotations

from contextlib import ExitStack

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from toolkit.errors import PreconditionRefused

PROBES = 4


def refuse_transaction_pooling(engine: Engine) -> None:
    """Raise :class:`PreconditionRefused` when the connection goes through a pooler that
    does not keep one server session per client session. Writes nothing."""
    pid = sa.text("SELECT pg_backend_pid()")
    with ExitStack() as stack:
        first = stack.enter_context(engine.connect())
        mine = first.execute(pid).scalar_one()
        first.commit()  # ends the transaction: a transaction pooler releases the backend now
        for _ in range(PROBES):
            other = stack.enter_context(engine.connect())
            theirs = other.execute(pid).scalar_one()  # stays in a transaction: keeps its backend
            again = first.execute(pid).scalar_one()
            first.commit()
            if theirs == mine or again != mine:
                raise _refusal()


def _refusal() -> PreconditionRefused:
    return PreconditionRefused(
        "The connection goes through a pooler in transaction or statement mode (PgBouncer?): "
        "two client sessions shared one server backend. The runner lock and each run's "
        "settings need a server session of their own; nothing was written",
        "connect directly to PostgreSQL (GitLab's documentation says migrations must bypass "
        "PgBouncer), or through a PgBouncer database entry with pool_mode=session")
