"""What an action is to the runner and to ``toolkit sql``: one protocol.

pgroll's operations are ``DBAction{ID(); Execute()}``; Django's operations describe
themselves and say whether they reduce to SQL; Alembic renders under ``--sql`` the same
operation it executes. Here every action a step returns (a batched pass, an Alembic
revision, plain statements, statements read from the archive, a Python body) answers the
same questions, so neither the runner nor ``toolkit sql`` asks what kind of action it
holds:

* ``name``, ``description``: what it is, for history, progress and ``toolkit sql``;
* ``tables``: the GitLab tables it writes (whose lock holders a timeout names, whose
  replicas the throttle watches);
* ``in_batches``: many short transactions (timeouts ``SET LOCAL``) rather than one change
  under the schema-change retries (session timeouts, reset right after);
* ``reduces_to_sql``: whether :meth:`render_sql` is the whole of it, or a Python body the
  text can only describe;
* :meth:`is_done` (safe to run again after a crash), :meth:`render_sql` (given a
  connection, statements read from the database are shown as they will run),
  :meth:`how_it_runs` (a comment for the reviewer), :meth:`execute`.

Implementations: :class:`toolkit.engine.step.KeysetPass` and the schema changes in
:mod:`toolkit.engine.ddl`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.engine import Connection, Engine

from toolkit.engine.budget import Budget
from toolkit.engine.events import Events
from toolkit.engine.results import PassResult
from toolkit.engine.settings import RunOptions


@dataclass(frozen=True)
class ActionRun:
    """What an action is given to execute within a run."""

    engine: Engine
    milestone: str
    run_id: int
    options: RunOptions
    budget: Budget
    # The run's lease check, for statements that commit by themselves (CONCURRENTLY).
    check_hold: Callable[[Connection], None] | None = None

    @property
    def events(self) -> Events:
        return self.budget.events


class Action(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def tables(self) -> tuple[str, ...]: ...

    @property
    def in_batches(self) -> bool: ...

    @property
    def reduces_to_sql(self) -> bool: ...

    def is_done(self, conn: Connection) -> bool: ...

    def render_sql(self, conn: Connection | None = None) -> str: ...

    def how_it_runs(self) -> str: ...

    def execute(self, run: ActionRun) -> PassResult: ...
