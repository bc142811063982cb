"""A milestone: an ordered list of steps, plus what it needs from the database."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from toolkit.engine.catalog_checks import trigger_in_place
from toolkit.engine.ddl import SchemaStep
from toolkit.engine.results import Check, StepPlan
from toolkit.engine.step import Step


@dataclass(frozen=True)
class Milestone:
    name: str
    number: int
    title: str
    steps: tuple[Step, ...]
    reads: tuple[str, ...]  # GitLab tables that must exist with the expected columns
    updates: tuple[str, ...] = ()  # GitLab tables it UPDATEs (privileges checked first)
    drops: tuple[str, ...] = ()  # GitLab tables it drops (their fingerprint goes on purpose)
    # Preconditions beyond "the previous milestone verifies" (milestone 4 has several).
    preconditions: Callable[[Connection], list[Check]] | None = field(default=None, compare=False)
    confirm: bool = False  # destructive: needs --yes or the database name typed

    def plan(self, conn: Connection) -> list[StepPlan]:
        return [step.plan(conn) for step in self.steps]

    def verify(self, conn: Connection) -> list[Check]:
        return [check for step in self.steps for check in step.verify(conn)]

    @property
    def changes(self) -> tuple[str, ...]:
        """Tables whose fingerprint this milestone changes on purpose."""
        return self.updates + self.drops


def superseded_by_cleanup(conn: Connection) -> bool:
    """True once milestone 4 has started (or its tables are gone): checks that join
    experiments are then answered by milestone 4's archive and its row-for-row check."""
    import sqlalchemy as sa

    from toolkit.engine.state import cleanup_started

    return cleanup_started(conn) or conn.execute(
        sa.text("SELECT to_regclass('ml_experiments') IS NULL")).scalar_one()


SUPERSEDED = "superseded: milestone 4 archived the experiments (toolkit.m4_archive_*)"


class TransitionTriggerStep(SchemaStep):
    """A schema step adding a transition trigger, which milestone 4 later removes on purpose."""

    trigger: str = ""
    table: str = ""
    milestone: str = ""

    def verify(self, conn: Connection) -> list[Check]:
        if superseded_by_cleanup(conn):
            return [Check(name=f"{self.trigger} is in place", ok=True, detail=SUPERSEDED)]
        return [trigger_in_place(conn, self.table, self.trigger, self.milestone)]
