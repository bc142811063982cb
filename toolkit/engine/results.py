"""What a step reports: a plan, a post-condition, an anomaly, what a pass did. A leaf module (it imports
nothing of the toolkit's but the row-listing helper), so milestones, the engine, the CLI and
the fingerprint can all speak of these without importing each other. Keyword-only: a plan
has eight fields, and ``StepPlan(name, text, 0, {}, {...}, [], sql)`` said none of them.

And what the engine hands back from them: the gate, a plan, a verify, an applied (or undone)
run; with the states a milestone is recorded in and the outcomes a run ends with, as the
database and ``--json`` spell them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from toolkit.engine.listing import count_of
from toolkit.errors import PreconditionRefused, VerificationFailed


class Milestone(Protocol):
    """The milestone a result is about, as a result speaks of it (engine/plan.py's
    Milestone is one; plan.py imports this module, so it is described, not imported)."""

    @property
    def name(self) -> str: ...

    @property
    def title(self) -> str: ...


@dataclass(kw_only=True)
class Anomaly:
    """A class of rows that needs the operator's attention.

    ``blocking`` anomalies are left untouched by apply; the others are changed and
    reported as warnings.
    """

    kind: str
    title: str
    blocking: bool
    resolution: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return count_of(self.rows)  # every matching row; ``rows`` holds the first of them

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "blocking": self.blocking,
                "count": self.count, "resolution": self.resolution,
                "rows": self.rows if limit is None else self.rows[:limit]}


@dataclass(kw_only=True)
class StepPlan:
    step: str
    description: str
    rows: int
    breakdown: dict[str, int] = field(default_factory=dict)  # sums to ``rows``
    context: dict[str, int] = field(default_factory=dict)  # related counts left unchanged
    anomalies: list[Anomaly] = field(default_factory=list)
    sql: list[str] = field(default_factory=list)
    kind: str = "data"  # or "schema": an Alembic revision, no rows

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "description": self.description, "rows": self.rows,
                "breakdown": self.breakdown, "context": self.context,
                "anomalies": [a.as_dict(limit) for a in self.anomalies], "sql": self.sql}


@dataclass(kw_only=True)
class Check:
    """One post-condition: what was checked, whether it holds, and what to do if not."""

    name: str
    ok: bool
    detail: str
    remedy: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    # The whole next step when this check fails, where "resolve what verify lists, then run
    # the milestone again" would not help (a difference from the baseline: running it again
    # compares with the same baseline and fails the same way).
    next_step: str | None = field(default=None, compare=False)
    # A stable identifier for CI to match on (``name`` is prose, for a person). Derived from
    # the name when not given; a check whose wording changes passes its old id here, so
    # the id never changes (tests/test_cli_operator.py pins those of verify's checks).
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or check_id(self.name)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "ok": self.ok, "detail": self.detail,
                "remedy": self.remedy, "count": count_of(self.rows), "rows": self.rows}


E = TypeVar("E", bound=StrEnum)


class MilestoneState(StrEnum):
    """Where a milestone stands, as ``toolkit.milestones.state`` holds it and ``status``
    and ``--json`` print it. ``not started`` is never stored (no row says it); its space is
    the spelling ``status --json`` has always printed."""

    NOT_STARTED = "not started"
    IN_PROGRESS = "in_progress"
    APPLIED = "applied"
    VERIFIED = "verified"
    ROLLED_BACK = "rolled_back"
    ROLLING_BACK = "rolling_back"

    @classmethod
    def _missing_(cls, value: object) -> MilestoneState | None:
        return _either_spelling(cls, value)


# A milestone in one of these has changed (or is changing) the database.
STARTED = frozenset({MilestoneState.IN_PROGRESS, MilestoneState.APPLIED, MilestoneState.VERIFIED,
                     MilestoneState.ROLLING_BACK})


class Outcome(StrEnum):
    """How a run ended, as ``toolkit.runs.outcome`` holds it and ``toolkit history`` and the
    ``run_end`` event say it. ``stopped unrecorded`` (written by the run after it, which
    found it still ``running``) keeps the space history has always stored."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    VERIFICATION_FAILED = "verification_failed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    ABORTED = "aborted"
    THROTTLED = "throttled"
    VETOED = "vetoed"  # a --hooks-dir hook (on-start, on-before-drop) refused to go on
    STOPPED_UNRECORDED = "stopped unrecorded"

    @classmethod
    def _missing_(cls, value: object) -> Outcome | None:
        return _either_spelling(cls, value)


def _either_spelling(cls: type[E], value: object) -> E | None:
    """A value written with the other separator (``not_started``, ``stopped_unrecorded``,
    ``rolled back``) reads as the same member: new writes use the member's value, and a row
    or a kept file spelled the other way still reads."""
    if not isinstance(value, str):
        return None
    key = value.replace("_", " ")
    return next((m for m in cls if m.value.replace("_", " ") == key), None)


@dataclass
class Gate:
    ok: bool
    previous: str | None = None
    failures: list[Check] = field(default_factory=list)

    def refusal(self, milestone: Milestone) -> PreconditionRefused:
        first = self.failures[0]
        if first.name.startswith("precondition:"):
            return PreconditionRefused(
                f"{milestone.name} must wait: {first.name.removeprefix('precondition: ')}: {first.detail}",
                first.remedy, details={"failures": [c.as_dict() for c in self.failures]})
        return PreconditionRefused(
            f"{milestone.name} must wait: {self.previous} does not verify ({first.name}: {first.detail})",
            f"run `toolkit verify {self.previous}` to see what blocks it, then "
            f"`toolkit migrate {self.previous}`",
            details={"previous": self.previous, "failures": [c.as_dict() for c in self.failures]},
        )

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "previous": self.previous,
                "failures": [c.as_dict() for c in self.failures]}


@dataclass
class PlanResult:
    milestone: Milestone
    steps: list[StepPlan]
    gate: Gate

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.steps)

    @property
    def blocking(self) -> int:
        """Rows a BLOCKING anomaly keeps out of the milestone (the operator's to resolve)."""
        return sum(a.count for s in self.steps for a in s.anomalies if a.blocking)

    @property
    def warnings(self) -> int:
        """Rows of the anomalies that are changed all the same, with a warning."""
        return sum(a.count for s in self.steps for a in s.anomalies if not a.blocking)


@dataclass
class VerifyResult:
    milestone: Milestone
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failure(self) -> VerificationFailed:
        failed = [c for c in self.checks if not c.ok]
        own = list(dict.fromkeys(c.next_step for c in failed if c.next_step))
        generic = (f"resolve each kind as `toolkit verify {self.milestone.name}` lists it, "
                   f"then run `toolkit migrate {self.milestone.name}` again")
        if any(not c.next_step for c in failed):
            own.insert(0, generic)
        return VerificationFailed(
            f"{self.milestone.name} does not verify: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
            "; ".join(own),
            details={"checks": [c.as_dict() for c in self.checks]},
        )


@dataclass
class ApplyResult:
    milestone: Milestone
    run_id: int
    passes: list[PassResult]
    stopped: str | None = None
    verify: VerifyResult | None = None
    outcome: Outcome = Outcome.SUCCEEDED
    # Wall time of each phase ("fingerprint", "apply", "verify", "checks") and of the run.
    timings: dict[str, float] = field(default_factory=dict)
    # Seconds spent waiting on the database's health, by signal (health.py).
    throttled_seconds: dict[str, float] = field(default_factory=dict)
    # The `toolkit control` requests the run took (control.py), as their events said them.
    controls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())

    @property
    def complete(self) -> bool:
        return self.stopped is None

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.passes)


@contextmanager
def timed(result: ApplyResult, phase: str) -> Iterator[None]:
    began = time.perf_counter()
    try:
        yield
    finally:
        result.timings[phase] = result.timings.get(phase, 0.0) + time.perf_counter() - began


# What an action of a rollback is: a batched pass, a schema change, a check or record.
ROWS, SCHEMA, CHECK = "rows", "schema change", "check"


@dataclass
class UndoPass:
    """One action of a rollback, counted before it runs (``rollback --dry-run``)."""

    name: str
    description: str
    kind: str  # ROWS, SCHEMA or CHECK
    rows: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)
    pending: bool = True  # a schema change still to undo, a check still to run

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "rows": self.rows, "breakdown": self.breakdown, "pending": self.pending}


@dataclass
class UndoPlan:
    """What ``rollback --dry-run`` says a rollback would restore, remove and undo."""

    milestone: Milestone
    state: MilestoneState
    passes: list[UndoPass]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.passes if p.kind == ROWS)

    @property
    def schema_changes(self) -> int:
        return sum(1 for p in self.passes if p.kind == SCHEMA and p.pending)

    def as_dict(self) -> dict[str, Any]:
        return {"milestone": self.milestone.name, "title": self.milestone.title, "state": self.state,
                "rows": self.rows, "schema_changes": self.schema_changes,
                "passes": [p.as_dict() for p in self.passes]}


def check_id(name: str) -> str:
    """``every candidate's model_id is its experiment's model`` ->
    ``every-candidates-model_id-is-its-experiments-model``: lower case, the words joined
    by ``-``, identifiers (``model_id``) kept whole."""
    words = re.sub(r"'s\b", "s", name.lower())
    return re.sub(r"[^a-z0-9_]+", "-", words).strip("-")


@dataclass
class PassResult:
    """What one pass or schema change did in this run: rows, batches, and why it stopped."""

    name: str
    rows: int = 0
    batches: int = 0
    complete: bool = False
    stopped: str | None = None
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # keys each batch took
    schema_change: bool = False  # a DDL action rather than a data pass
    changed: bool = True
    seconds: float = 0.0  # wall time of the whole pass or schema change, retries included
    outcome: str | None = None  # what a check or record action found or did
    # A pass an earlier run of the same attempt finished, not walked again: the rows that
    # attempt changed in it (this run's ``rows`` stay 0). None: walked (or begun) by this run.
    finished_before: int | None = None
    wal_bytes: int = 0  # WAL the primary wrote during this run's batches of the pass


@dataclass(frozen=True)
class Final:
    """Why a milestone can no longer be undone (milestone 4 once its archive is dropped):
    the runner refuses up front what would need undoing it, and ``status`` says so instead
    of advising a command that cannot succeed."""

    why: str  # "its archive was dropped by run 12 at ...": follows "<milestone> cannot be rolled back: "
    instead: str  # what to do instead (the error's "Next")
    details: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"why": self.why, "instead": self.instead, **self.details}
