"""What a step is, apart from how and when it runs (Alembic's ops vs. toimpl vs. runtime).

A milestone is an ordered list of :class:`Step` objects. One step object answers every
question the commands ask, so ``plan``, ``sql``, ``migrate``, ``verify`` and
``rollback`` cannot drift apart:

* :meth:`Step.plan` counts exactly what would change and finds anomalies (read-only);
* :meth:`Step.forward` / :meth:`Step.backward` return the *passes* that change data:
  their SQL is what ``toolkit sql`` prints and what the engine executes;
* :meth:`Step.verify` checks post-conditions (read-only, Sqitch-style).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine.batches import run_pass
from toolkit.engine.results import Check, PassResult, StepPlan

if TYPE_CHECKING:
    from toolkit.engine.actions import Action, ActionRun


@dataclass(frozen=True)
class KeysetPass:
    """A data change done in short batches over the primary key of a driving table.

    A pass covers the keys up to the largest one when it started (kept in the checkpoint,
    so a resumed pass has the same end); it never chases rows inserted meanwhile. Each
    batch covers the next keys after the checkpoint (as many as the batch size): the engine finds
    the batch's upper key, then runs ``change_sql`` with ``:lo`` (exclusive) and ``:hi``
    (inclusive) and ``:run_id`` bound; ``change_sql`` returns one row, the number of rows
    it changed. It must be idempotent: a pass restarts from the beginning after it has
    once completed, so rows written late by the application are picked up.
    """

    name: str
    description: str
    driving_table: str
    change_sql: str
    key: str = "id"
    locks: tuple[str, ...] = ()  # tables whose lock holders to name on a lock timeout
    retry_unique_violation: bool = False  # a concurrent insert can race the collision check
    # When the pass reaches its bound, go on up to the new largest key (rows the
    # application inserted meanwhile), a few rounds at most.
    catch_up: bool = False
    # A batch body in Python, for changes SQL alone cannot express (slugs). It must run
    # only the statements ``change_sql`` shows, and return the rows it changed.
    apply: Callable[[Connection, int, int, int], int] | None = field(default=None, compare=False)
    # A query that returns true when there is nothing to walk (the driving table or column
    # is gone, after a crash past the point where it was dropped).
    skip_if_sql: str | None = None
    # Which rows of the driving table can need a change at all (a condition on its
    # columns). Batches then hold ``batch_size`` of those rows rather than of all rows:
    # milestone 1 needs the tenth of candidates that have a package, and a batch of
    # 5000 keys of which 4500 need nothing costs a commit and a checkpoint for little.
    driving_filter: str | None = None
    # For ``rollback --dry-run``: what the pass would change now, read-only, as labelled
    # counts (the first is the rows the pass reports). Without it, the rows of the driving
    # table it would walk (engine/undo_plan.py).
    count: Callable[[Connection], dict[str, int]] | None = field(default=None, compare=False)

    def _where(self) -> str:
        extra = f" AND ({self.driving_filter})" if self.driving_filter else ""
        return f"WHERE {self.key} > :lo AND {self.key} <= :upper{extra}"

    def next_key_sql(self) -> str:
        """The batch's upper key and how many keys it covers (for progress and sizing)."""
        return (f"SELECT max({self.key}), count(*) FROM (SELECT {self.key} FROM {self.driving_table} "
                f"{self._where()} ORDER BY {self.key} LIMIT :size) AS batch")

    def upper_key_sql(self) -> str:
        return f"SELECT COALESCE(max({self.key}), 0) FROM {self.driving_table}"

    def remaining_sql(self) -> str:
        return f"SELECT count(*) FROM {self.driving_table} {self._where()}"

    # -- the action protocol (engine/actions.py) ------------------------------------------
    in_batches = True
    reduces_to_sql = True  # a Python ``apply`` runs only the statements ``change_sql`` shows

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables a pass writes, as far as the engine knows: its driving table, and
        those whose locks it takes."""
        return tuple(dict.fromkeys((self.driving_table, *self.locks)))

    def is_done(self, conn: Connection) -> bool:
        """Nothing left to walk (a pass is idempotent: done means a walk would change 0)."""
        if self.skip_if_sql and conn.execute(sa.text(self.skip_if_sql)).scalar():
            return True
        return not conn.execute(sa.text(self.remaining_sql()), {"lo": 0, "upper": 2**62}).scalar_one()

    def render_sql(self, conn: Connection | None = None) -> str:
        return self.change_sql.strip()

    def how_it_runs(self) -> str:
        bounds = "\n".join(f"--   {line}" for line in self.next_key_sql().splitlines())
        return ("Runs in batches, each one transaction. Batch bounds: :lo (exclusive, the\n"
                f"-- checkpoint) and :hi from\n{bounds}")

    def execute(self, run: ActionRun) -> PassResult:
        return run_pass(run.engine, run.milestone, self, run.run_id, run.options, run.budget)


class Step:
    """Base class; subclasses override what applies to them."""

    name: str = ""
    description: str = ""
    unit: str = "rows"  # what ``remaining`` counts

    def plan(self, conn: Connection) -> StepPlan:
        raise NotImplementedError

    def forward(self) -> Sequence[Action]:
        return []

    def backward(self) -> Sequence[Action]:
        return []

    def verify(self, conn: Connection) -> list[Check]:
        return []

    def remaining(self, conn: Connection) -> int:
        """Rows still to change; ``status`` calls this, so it should be cheaper than plan."""
        return self.plan(conn).rows

    def schema_change_actions(self) -> list[Action]:
        """The forward actions a run reports as schema changes (tables, columns, indexes,
        constraints, triggers): neither batched passes nor checks and records, which say
        what they found instead. One definition, so that ``status`` counts what ``migrate``
        reports ("N schema changes"), and an interrupted rollback what is still in place."""
        return [a for a in self.forward()
                if not a.in_batches and getattr(a, "outcome", None) is None]

    @property
    def schema_changes(self) -> int:
        return len(self.schema_change_actions())

    def schema_changes_left(self, conn: Connection) -> int:
        """Schema changes a migrate would still make: those not in place (read-only)."""
        return sum(1 for a in self.schema_change_actions() if not a.is_done(conn))

    def rollback_checks(self, conn: Connection) -> list[Check]:
        """After the backward passes: is everything the step did undone?"""
        return []

    def forward_sql(self) -> list[str]:
        return [a.render_sql() for a in self.forward()]

    def backward_sql(self) -> list[str]:
        return [a.render_sql() for a in self.backward()]
