"""The plan the engine receives (Sqitch's engine is handed its plan): the milestones in
order, what each reads, changes and drops, and what must hold before it runs.

The engine knows no milestone by name. ``toolkit.milestones`` builds the plan; the runner,
the preflight and ``status`` ask it which milestone comes before or after another, which
GitLab tables make a database GitLab's, and which objects a started milestone may already
have removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine import state
from toolkit.engine.adopted import adopted_final
from toolkit.engine.results import STARTED, Check, Final, StepPlan
from toolkit.engine.step import Step
from toolkit.errors import UsageProblem
from toolkit.verify.named import Fix, Named


@dataclass(frozen=True)
class Supersedes:
    """What a later milestone takes over from earlier ones once it has started: the checks
    of theirs that read what it removes (milestone 4 archives and drops the experiments
    milestones 2 and 3 linked). Their steps that say so (``superseded_checks``) then plan
    nothing, have nothing left and hold, answered by the later milestone's own checks."""

    milestones: tuple[str, ...]  # the ids of the milestones whose checks it takes over
    why: str  # shown as the superseded checks' detail and the plans' context
    # True when what it removes is gone though its state says nothing (its state lost)
    gone_sql: str | None = None


@dataclass(frozen=True, kw_only=True)
class Milestone:
    name: str  # its id, "milestone-N": written once, in its own module
    title: str
    steps: tuple[Step, ...]
    reads: tuple[str, ...]  # GitLab tables that must exist with the expected columns
    updates: tuple[str, ...] = ()  # GitLab tables it UPDATEs (privileges checked first)
    drops: tuple[str, ...] = ()  # GitLab tables it drops (their fingerprint goes on purpose)
    drops_columns: tuple[str, ...] = ()  # "table.column" it drops
    # "table.column" it adds to GitLab's tables: with what it drops, how GitLab's catalog
    # shows the milestone in place when the toolkit's own schema is lost (engine/ledger.py)
    adds_columns: tuple[str, ...] = ()
    # For a table it updates only in part: the condition (on columns it does not change)
    # on the rows it may change. Its verify proves every other row of the table unchanged.
    may_change: dict[str, str] = field(default_factory=dict, compare=False)
    # For an MLflow part only some of whose rows it can change (fingerprint.PART_TABLES):
    # the condition on those rows. Its baseline and verify hash only them; the others are
    # made from tables its runs do not write, proven untouched like the parts it never reads.
    may_change_parts: dict[str, str] = field(default_factory=dict, compare=False)
    # Preconditions beyond "the previous milestone verifies" (milestone 4 has several).
    preconditions: Callable[[Connection], list[Check]] | None = field(default=None, compare=False)
    confirm: bool = False  # destructive: needs --yes or the database name typed
    # When it has become final (cannot be rolled back any more): why, else None.
    final: Callable[[Connection], Final | None] | None = field(default=None, compare=False)
    # The rows its blocking anomalies name (table -> id -> kinds), recorded with its baseline,
    # and how the operator's fix of each may change them (verify/named.py).
    named: Callable[[Connection], Named] | None = field(default=None, compare=False)
    fixes: tuple[Fix, ...] = field(default=(), compare=False)
    # The action before which `migrate --hold-before-drop` waits (its first drop); None: no hold.
    hold_point: str | None = None
    # The earlier milestones whose checks it takes over once started; None: none.
    supersedes: Supersedes | None = None

    def final_now(self, conn: Connection) -> Final | None:
        if (adopted := adopted_final(conn, self.name)) is not None:
            return adopted
        return self.final(conn) if self.final is not None else None

    def plan(self, conn: Connection) -> list[StepPlan]:
        return [step.plan(conn) for step in self.steps]

    def verify(self, conn: Connection, between: Callable[[], None] | None = None) -> list[Check]:
        """Each step's checks; ``between`` is called before each step's (a run's closing
        verify reads `toolkit control` requests there)."""
        checks: list[Check] = []
        for step in self.steps:
            if between is not None:
                between()
            checks += step.verify(conn)
        return checks

    @property
    def changes(self) -> tuple[str, ...]:
        """Tables whose fingerprint this milestone changes on purpose."""
        return self.updates + self.drops

    @property
    def removes(self) -> frozenset[str]:
        """What it drops, tables and ``table.column``: once it has started they may be gone."""
        return frozenset(self.drops + self.drops_columns)


@dataclass(frozen=True)
class MilestonePlan:
    """The registered milestones in their order of registration (toolkit/milestones/registry.py):
    before, after and the short alias (``1`` for the first) all come from that order."""

    milestones: tuple[Milestone, ...]

    def __iter__(self) -> Iterator[Milestone]:
        return iter(self.milestones)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.milestones]

    def number(self, milestone: Milestone) -> int:
        """Its place in the plan, from 1: the short alias the commands take (``1``)."""
        return self.names.index(milestone.name) + 1

    def get(self, name: str) -> Milestone:
        for number, milestone in enumerate(self.milestones, start=1):
            if name in (milestone.name, str(number)):
                return milestone
        raise UsageProblem(f"Unknown milestone {name!r}", f"use one of: {', '.join(self.names)}")

    def previous(self, milestone: Milestone) -> Milestone | None:
        at = self.number(milestone) - 1
        return self.milestones[at - 1] if at > 0 else None

    def next(self, milestone: Milestone) -> Milestone | None:
        at = self.number(milestone)
        return self.milestones[at] if at < len(self.milestones) else None

    def later(self, milestone: Milestone) -> list[Milestone]:
        return list(self.milestones[self.number(milestone):])

    def superseding(self, name: str) -> list[Milestone]:
        """The later milestones that take over the checks of milestone ``name``."""
        return [m for m in self.milestones if m.supersedes is not None and name in m.supersedes.milestones]

    def superseded(self, conn: Connection, name: str) -> Supersedes | None:
        """What takes over milestone ``name``'s superseded checks now: a later milestone that
        has started (or whose removals are found done though its state is lost), else None."""
        for later in self.superseding(name):
            by = later.supersedes
            assert by is not None
            if state.milestone_state(conn, later.name)["state"] in STARTED or (
                    by.gone_sql and conn.execute(sa.text(by.gone_sql)).scalar_one()):
                return by
        return None

    @property
    def reads(self) -> tuple[str, ...]:
        """GitLab's tables that some milestone reads: what makes a database GitLab's."""
        return tuple(dict.fromkeys(t for m in self.milestones for t in m.reads))

    def may_be_gone(self, conn: Connection) -> frozenset[str]:
        """Tables and columns a milestone that has started may have dropped already."""
        gone: set[str] = set()
        for milestone in self.milestones:
            if milestone.removes and state.milestone_state(conn, milestone.name)["state"] in STARTED:
                gone |= milestone.removes
        return frozenset(gone)
