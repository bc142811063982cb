"""A milestone: an ordered list of steps, plus what it needs from the database."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Connection

from toolkit.engine.step import Check, Step, StepPlan


@dataclass(frozen=True)
class Milestone:
    name: str
    number: int
    title: str
    steps: tuple[Step, ...]
    reads: tuple[str, ...]  # GitLab tables that must exist with the expected columns
    updates: tuple[str, ...] = ()  # GitLab tables it UPDATEs (privileges checked first)

    def plan(self, conn: Connection) -> list[StepPlan]:
        return [step.plan(conn) for step in self.steps]

    def verify(self, conn: Connection) -> list[Check]:
        return [check for step in self.steps for check in step.verify(conn)]
