"""What a step is, apart from how and when it runs (Alembic's ops vs. toimpl vs. runtime).

A milestone is an ordered list of :class:`Step` objects. One step object answers every
question the commands ask, so ``plan``, ``sql``, ``migrate``, ``verify`` and
``rollback`` cannot drift apart:

* :meth:`Step.plan` counts exactly what would change and finds anomalies (read-only);
* :meth:`Step.forward` / :meth:`Step.backward` return the actions that change data (a
  :class:`~toolkit.engine.batches.KeysetPass`, a schema change): their SQL is what
  ``toolkit sql`` prints and what the engine executes;
* :meth:`Step.verify` checks post-conditions (read-only, Sqitch-style).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection

from toolkit.engine.results import Check, StepPlan

if TYPE_CHECKING:
    from toolkit.engine.actions import Action


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
