"""What the milestones look like now, read in snapshots the server keeps read-only: the plan,
the gate, verification, status, whether a milestone is final, what a rollback would undo.

Nothing here writes, not even the toolkit's own history: ``plan``, ``verify``, ``status``,
``fingerprint`` and ``rollback --dry-run`` use this alone, and the runner (runner.py) asks
it the same questions before and after it writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from toolkit.db import READ_ONLY_OPTION
from toolkit.engine import baselines, state
from toolkit.engine.events import LOGGED, Events
from toolkit.engine.ledger import refuse_lost_ledger
from toolkit.engine.listing import count_of
from toolkit.engine.plan import Milestone, MilestonePlan
from toolkit.engine.preflight import check_gitlab_database, check_gitlab_schema
from toolkit.engine.results import (
    STARTED,
    Check,
    Final,
    Gate,
    MilestoneState,
    PlanResult,
    UndoPlan,
    VerifyResult,
)
from toolkit.engine.undo_plan import undo_plan
from toolkit.errors import PreconditionRefused
from toolkit.schema.migrations import own_schema_exists
from toolkit.verify.digest import Memo


class Inspector:
    """Reads the milestones of the plan it is given; writes nothing."""

    def __init__(self, engine: Engine, plan: MilestonePlan, events: Events = LOGGED):
        self.engine = engine
        self.milestones = plan
        self.events = events
        self._ledger_checked = False

    def _refuse_lost_ledger(self, conn: Connection) -> None:
        """Once per inspector, before its first read: a toolkit schema lost while GitLab's
        tables show milestones in place is named, and every command refused (ledger.py)."""
        if not self._ledger_checked:
            refuse_lost_ledger(conn, self.milestones)
            self._ledger_checked = True

    @contextmanager
    def read_only(self) -> Iterator[Connection]:
        """One transaction whose first statement is ``SET TRANSACTION ISOLATION LEVEL
        REPEATABLE READ, READ ONLY`` (db.READ_ONLY_OPTION): consistent counts, and the server
        refuses any write in it, whatever the pooled connection was used for before. Rolled
        back at the end."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(**{READ_ONLY_OPTION: True})
            with conn.begin() as transaction:
                try:
                    self._refuse_lost_ledger(conn)
                    yield conn
                finally:
                    transaction.rollback()

    def check_gitlab(self, conn: Connection, *, columns: bool = True) -> None:
        """Refuse (exit 3) a database that is not GitLab's (preflight.check_gitlab_database)."""
        check_gitlab_database(conn, self.milestones, columns=columns)

    def check_reads(self, conn: Connection, tables: tuple[str, ...]) -> None:
        """The tables a milestone reads are there with their columns, but for what a started
        milestone drops on purpose (the plan says which)."""
        check_gitlab_schema(conn, tables, may_be_gone=self.milestones.may_be_gone(conn))

    def plan(self, milestone: Milestone) -> PlanResult:
        with self.read_only() as conn:
            self.check_reads(conn, milestone.reads)
            steps = milestone.plan(conn)
            gate = self.gate(conn, milestone)
        return PlanResult(milestone, steps, gate)

    def verify(self, milestone: Milestone, between: Callable[[], None] | None = None) -> VerifyResult:
        return self.verify_many([milestone], between)[0]

    def verify_many(self, chosen: list[Milestone],
                    between: Callable[[], None] | None = None) -> list[VerifyResult]:
        """Each milestone's checks, then the comparison with the fingerprint taken before it,
        all in one snapshot (digests the fingerprints share are computed once).
        Gates run the checks only: the comparison reads every ML row and belongs to the
        milestone's own verification, not to the next one's plan. ``between`` is called
        before each step's checks, before the comparison and after it (a run's closing
        verify: runner.Runner._steered_verify)."""
        results = []
        memo: Memo = {}
        with self.read_only() as conn:
            for milestone in chosen:
                self.check_reads(conn, milestone.reads)
                checks = milestone.verify(conn, between)
                if between is not None:
                    between()
                checks += baselines.checks_against_baseline(
                    conn, milestone.name, changes=milestone.changes,
                    compare_tables=not self.later_started(conn, milestone), memo=memo,
                    fixes=milestone.fixes)
                if between is not None:
                    between()
                results.append(VerifyResult(milestone, checks))
        return results

    def later_started(self, conn: Connection, milestone: Milestone) -> list[str]:
        """The milestones after ``milestone`` that have changed (or are changing) the database."""
        return [m.name for m in self.milestones.later(milestone)
                if state.milestone_state(conn, m.name)["state"] in STARTED]

    def gate(self, conn: Connection, milestone: Milestone) -> Gate:
        """Whether ``milestone`` may start: the one before it verifies, and its own
        preconditions hold."""
        previous = self.milestones.previous(milestone)
        failures: list[Check] = []
        if previous is not None:
            self.check_reads(conn, previous.reads)
            failures = [c for c in previous.verify(conn) if not c.ok]
        if milestone.preconditions is not None:
            failures += [c for c in milestone.preconditions(conn) if not c.ok]
        return Gate(not failures, previous.name if previous else None, failures)

    def states(self) -> dict[str, MilestoneState]:
        """Each milestone's recorded state, read-only; refused when the database is not
        GitLab's (its states would all be 'not started')."""
        with self.read_only() as conn:
            self.check_gitlab(conn)
            return {name: state.milestone_state(conn, name)["state"] for name in self.milestones.names}

    def status(self) -> list[dict[str, Any]]:
        """Where each milestone stands (``toolkit status``), in one snapshot."""
        with self.read_only() as conn:
            return [self._status_of(conn, milestone) for milestone in self.milestones]

    def _status_of(self, conn: Connection, milestone: Milestone) -> dict[str, Any]:
        self.check_reads(conn, milestone.reads)
        recorded = state.milestone_state(conn, milestone.name)
        final = milestone.final_now(conn)
        # A final milestone has nothing left to undo: a rollback could never finish.
        undoing = recorded["state"] == MilestoneState.ROLLING_BACK and final is None
        return {
            "milestone": milestone.name,
            "title": milestone.title,
            "state": recorded["state"],
            "updated_at": recorded.get("updated_at"),
            "checkpoints": [cp.__dict__ for cp in state.checkpoints(conn, milestone.name)],
            "remaining": {s.name: s.remaining(conn) for s in milestone.steps if s.unit == "rows"},
            # What a migrate would still report as schema changes; none once final
            # (a migrate of a final milestone runs no passes, only its verify).
            "schema_changes_left": 0 if final else sum(s.schema_changes_left(conn)
                                                       for s in milestone.steps),
            # An interrupted rollback: what its checks still find not undone.
            "left_to_undo": _left_to_undo(conn, milestone) if undoing else [],
            "final": final.as_dict() if final else None,
        }

    def final(self, milestone: Milestone) -> tuple[Final | None, MilestoneState]:
        """Whether ``milestone`` can no longer be rolled back (and why), and its state.

        Read-only through ``SET TRANSACTION READ ONLY``, not :meth:`read_only`'s connection
        characteristic: the command asks this before any preflight, and a pooled connection
        whose characteristic was set is handed back read-write, which would hide a read-only
        role and make a replica fail on ``BEGIN READ WRITE`` instead of being named."""
        with self.engine.connect() as conn, conn.begin() as transaction:
            try:
                conn.execute(sa.text("SET TRANSACTION READ ONLY"))
                self._refuse_lost_ledger(conn)
                return milestone.final_now(conn), state.milestone_state(conn, milestone.name)["state"]
            finally:
                transaction.rollback()

    def refuse_out_of_order(self, milestone: Milestone, verb: str) -> None:
        """Before any other check: a later milestone in the way is the one thing to say (after
        milestone 4 the tables the other checks read are gone). A milestone that is final (or
        a final one in the way) is refused too, naming why: its rollback could never succeed."""
        with self.read_only() as conn:
            refusal = self.out_of_order(conn, milestone, verb)
        if refusal is not None:
            raise refusal

    def out_of_order(self, conn: Connection, milestone: Milestone, verb: str) -> PreconditionRefused | None:
        """The refusal :meth:`refuse_out_of_order` raises, read in ``conn``; None when in order."""
        started = self.later_started(conn, milestone)
        undoing = [name for name in started
                   if state.milestone_state(conn, name)["state"] == MilestoneState.ROLLING_BACK]
        if verb == "migrate":
            started = [name for name in started if self.milestones.get(name).drops]
        in_the_way = [milestone] if verb == "rollback" else []
        in_the_way += [self.milestones.get(name) for name in started]
        final = next(((m, f) for m in in_the_way if (f := m.final_now(conn)) is not None), None)
        if final is not None:
            return _final_in_the_way(milestone, verb, *final)
        if started:
            return _later_in_the_way(milestone, verb, started, undoing)
        return None

    def rollback_plan(self, milestone: Milestone) -> UndoPlan:
        """What ``rollback`` would restore and remove, counted from the ledgers and the archive
        without writing anything (``rollback --dry-run``). Refused where the rollback itself
        would be: a later milestone in the way, or this one final."""
        with self.read_only() as conn:
            if (refusal := self.out_of_order(conn, milestone, "rollback")) is not None:
                raise refusal
            self.check_reads(conn, milestone.reads)
            now = state.milestone_state(conn, milestone.name)["state"]
            if not own_schema_exists(conn):  # the toolkit never ran here: no ledger to undo
                return UndoPlan(milestone, now, [])
            actions = [a for step in reversed(milestone.steps) for a in step.backward()]
            return undo_plan(conn, milestone, now, actions)


def _left_to_undo(conn: Connection, milestone: Milestone) -> list[str]:
    """An interrupted rollback: what its checks still find not undone, and the schema
    changes still in place."""
    left = [f"{c.name}: not yet" + (f" ({count_of(c.rows)} left)" if c.rows else "")
            for step in milestone.steps for c in step.rollback_checks(conn) if not c.ok]
    if kept := sum(s.schema_changes - s.schema_changes_left(conn) for s in milestone.steps):
        left.append(f"{kept} schema changes still in place")
    return left


def _final_in_the_way(milestone: Milestone, verb: str, final_one: Milestone,
                      why: Final) -> PreconditionRefused:
    """``milestone`` is final, or a later one in the way is: its rollback could never succeed."""
    what = "be rolled back" if verb == "rollback" else "be migrated again"
    problem = (f"{milestone.name} cannot be rolled back: {why.why}" if final_one is milestone
               else f"{milestone.name} cannot {what}: {final_one.name} is final, "
                    f"{why.why}, so it cannot be rolled back first")
    return PreconditionRefused(problem, why.instead, details={"final": final_one.name, **why.details})


def _later_in_the_way(milestone: Milestone, verb: str, started: list[str],
                      undoing: list[str]) -> PreconditionRefused:
    """Later milestones that are applied (or being rolled back) must be rolled back first."""
    plural = "are" if len(started) > 1 else "is"
    where = "applied" if not set(undoing) & set(started) else (
        "being rolled back" if set(started) <= set(undoing) else "applied or being rolled back")
    what = "be rolled back" if verb == "rollback" else "be migrated again"
    return PreconditionRefused(
        f"{milestone.name} cannot {what} while {_and(started)} {plural} {where}",
        f"roll back in reverse order: `toolkit rollback {started[-1]}` first",
        details={"applied": started},
    )


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
