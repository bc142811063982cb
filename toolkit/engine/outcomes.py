"""What the runner hands back: the gate, a plan, a verify, an applied (or undone) run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from toolkit.engine.plan import Milestone
from toolkit.engine.results import Check, PassResult, StepPlan
from toolkit.errors import PreconditionRefused, VerificationFailed


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
    outcome: str = "succeeded"
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
