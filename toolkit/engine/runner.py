"""When steps run: dry runs in a read-only snapshot, gates, the runner lock, history, signals.

The runner is the only place that decides *when* a step's passes execute; the steps say
*what* changes, the batch loop says *how*.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection, Engine

from toolkit import milestones as registry
from toolkit.engine import state
from toolkit.engine.batches import (
    Budget,
    PassResult,
    RunOptions,
    after_action,
    read_with_retries,
    run_pass,
)
from toolkit.engine.ddl import DdlAction, SqlDdlAction, run_ddl
from toolkit.engine.locks import RunnerLock
from toolkit.engine.pooling import refuse_transaction_pooling
from toolkit.engine.preflight import check_gitlab_schema, check_privileges, check_writable
from toolkit.engine.step import Action, Check, StepPlan
from toolkit.errors import Interrupted, PreconditionRefused, ToolkitError, VerificationFailed, redact
from toolkit.milestones.base import Milestone
from toolkit.output import out
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.schema.migrations import ensure_own_tables
from toolkit.verify import baselines
from toolkit.verify.digest import Memo
from toolkit.verify.fingerprint import take


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
            f"{milestone.name} must wait: {self.previous} does not verify ({first.detail})",
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


@dataclass
class VerifyResult:
    milestone: Milestone
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failure(self) -> VerificationFailed:
        failed = [c for c in self.checks if not c.ok]
        return VerificationFailed(
            f"{self.milestone.name} does not verify: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
            f"resolve each kind as `toolkit verify {self.milestone.name}` lists it, "
            f"then run `toolkit migrate {self.milestone.name}` again",
            details={"checks": [c.as_dict() for c in self.checks]},
        )


@dataclass
class ApplyResult:
    milestone: Milestone
    run_id: int
    passes: list[PassResult]
    stopped: str | None = None
    verify: VerifyResult | None = None

    @property
    def complete(self) -> bool:
        return self.stopped is None

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.passes)


class Runner:
    def __init__(self, engine: Engine, options: RunOptions | None = None, *, command: str = "",
                 lock_wait_s: float = 10.0):
        self.engine = engine
        self.options = options or RunOptions()
        self.command = command
        self.lock_wait_s = lock_wait_s

    # -- read-only -------------------------------------------------------------------
    @contextmanager
    def read_only(self) -> Iterator[Connection]:
        """One REPEATABLE READ, READ ONLY transaction: consistent counts, and no way to write."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with conn.begin() as transaction:
                try:
                    yield conn
                finally:
                    transaction.rollback()

    def plan(self, milestone: Milestone) -> PlanResult:
        with self.read_only() as conn:
            check_gitlab_schema(conn, milestone.reads)
            steps = milestone.plan(conn)
            gate = self._gate(conn, milestone)
        return PlanResult(milestone, steps, gate)

    def verify(self, milestone: Milestone) -> VerifyResult:
        return self.verify_many([milestone])[0]

    def verify_many(self, chosen: list[Milestone]) -> list[VerifyResult]:
        """Each milestone's checks, then the comparison with the fingerprint taken before it,
        all in one snapshot (digests the fingerprints share are computed once).
        Gates run the checks only: the comparison reads every ML row and belongs to the
        milestone's own verification, not to the next one's plan."""
        results = []
        memo: Memo = {}
        with self.read_only() as conn:
            for milestone in chosen:
                check_gitlab_schema(conn, milestone.reads)
                checks = milestone.verify(conn)
                checks += baselines.checks_against_baseline(
                    conn, milestone.name, changes=milestone.changes,
                    compare_tables=not self._later_started(conn, milestone), memo=memo)
                results.append(VerifyResult(milestone, checks))
        return results

    @staticmethod
    def _later_started(conn: Connection, milestone: Milestone) -> list[str]:
        return [m.name for m in registry.later(milestone)
                if state.milestone_state(conn, m.name)["state"]
                in (state.IN_PROGRESS, state.APPLIED, state.VERIFIED)]

    def _gate(self, conn: Connection, milestone: Milestone) -> Gate:
        previous = registry.previous(milestone)
        failures: list[Check] = []
        if previous is not None:
            check_gitlab_schema(conn, previous.reads)
            failures = [c for c in previous.verify(conn) if not c.ok]
        if milestone.preconditions is not None:
            failures += [c for c in milestone.preconditions(conn) if not c.ok]
        return Gate(not failures, previous.name if previous else None, failures)

    def status(self) -> list[dict[str, Any]]:
        report = []
        with self.read_only() as conn:
            for milestone in registry.MILESTONES.values():
                check_gitlab_schema(conn, milestone.reads)
                recorded = state.milestone_state(conn, milestone.name)
                report.append({
                    "milestone": milestone.name,
                    "title": milestone.title,
                    "state": recorded["state"],
                    "updated_at": recorded.get("updated_at"),
                    "checkpoints": [cp.__dict__ for cp in state.checkpoints(conn, milestone.name)],
                    "remaining": {s.name: s.remaining(conn) for s in milestone.steps if s.unit == "rows"},
                    "schema_changes_left": sum(s.remaining(conn) for s in milestone.steps
                                               if s.unit != "rows"),
                })
        return report

    # -- writes ----------------------------------------------------------------------
    def _prepare_write(self, milestone: Milestone) -> None:
        with self.engine.connect() as conn:
            check_gitlab_schema(conn, milestone.reads)
            check_writable(conn)
            check_privileges(conn, milestone.updates, milestone.reads)
            conn.rollback()
        refuse_transaction_pooling(self.engine)

    def migrate(self, milestone: Milestone, *, verify_after: bool = True,
                go_ahead: Callable[[], None] | None = None) -> ApplyResult:
        """Apply ``milestone``. ``go_ahead`` runs once the gate and the preconditions hold and
        before anything is written (it raises to refuse), so an operator is never asked to
        confirm a run that would be refused anyway."""
        self._prepare_write(milestone)
        with self.read_only() as conn:
            gate = self._gate(conn, milestone)
        if not gate.ok:
            raise gate.refusal(milestone)
        if go_ahead is not None:
            go_ahead()
        with self.engine.connect() as conn:
            ensure_own_tables(conn)
        passes = [p for step in milestone.steps for p in step.forward()]
        result = self._run_passes(milestone, passes, state.IN_PROGRESS, "migrate",
                                  before=self.take_baseline)
        if result.complete:
            with self.engine.connect() as conn:
                state.set_milestone_state(conn, milestone.name, state.APPLIED, result.run_id)
            if verify_after:
                result.verify = self.verify(milestone)
                if result.verify.ok:
                    with self.engine.connect() as conn:
                        state.set_milestone_state(conn, milestone.name, state.VERIFIED, result.run_id)
        outcome = ("partial" if not result.complete else
                   "verification_failed" if result.verify and not result.verify.ok else "succeeded")
        self._finish(result, outcome)
        return result

    def rollback(self, milestone: Milestone) -> tuple[ApplyResult, list[Check]]:
        self._prepare_write(milestone)
        with self.engine.connect() as conn:
            ensure_own_tables(conn)
            blocking = self._later_started(conn, milestone)
        if blocking:
            raise PreconditionRefused(
                f"{milestone.name} cannot be rolled back while {', '.join(blocking)} is applied",
                f"roll back in reverse order: `toolkit rollback {blocking[-1]}` first",
            )
        passes = [p for step in reversed(milestone.steps) for p in step.backward()]
        result = self._run_passes(milestone, passes, None, "rollback")
        checks: list[Check] = []
        if result.complete:
            with self.read_only() as conn:
                checks = [c for step in milestone.steps for c in step.rollback_checks(conn)]
                back = baselines.checks_against_baseline(conn, milestone.name, rolled_back=True)
            checks += back
            with self.engine.connect() as conn:
                if all(c.ok for c in back):  # kept otherwise: the next attempt compares with it
                    baselines.forget(conn, milestone.name)
                state.clear_checkpoints(conn, milestone.name)
                conn.commit()
                state.set_milestone_state(conn, milestone.name, state.ROLLED_BACK, result.run_id)
        outcome = "partial" if not result.complete else (
            "succeeded" if all(c.ok for c in checks) else "verification_failed")
        self._finish(result, outcome)
        return result, checks

    def _recorded_command(self, verb: str, milestone: Milestone) -> str:
        """The command for history. One that runs several milestones (``toolkit demo``) gets
        the part this run was, so history still says what each of its runs did."""
        if not self.command:
            return f"toolkit {verb} {milestone.name}"
        if milestone.name in self.command:
            return self.command
        return f"{self.command} ({verb} {milestone.name})"

    def _run_passes(self, milestone: Milestone, passes: list[Action], state_during: str | None,
                    verb: str, before: Callable[[Milestone], None] | None = None) -> ApplyResult:
        label = f"toolkit {verb} {milestone.name}"
        with RunnerLock(self.engine, label, self.lock_wait_s):
            with self.engine.connect() as conn:
                run_id = state.start_run(conn, self._recorded_command(verb, milestone), milestone.name,
                                         self.options.as_dict())
                if state_during:
                    state.set_milestone_state(conn, milestone.name, state_during, run_id)
            result = ApplyResult(milestone, run_id, [])
            budget = Budget(self.options)
            try:
                with _stop_on_signals(budget):
                    if before is not None:
                        before(milestone)
                    for action in passes:
                        if isinstance(action, DdlAction | SqlDdlAction):
                            if reason := budget.exhausted_reason():
                                done = PassResult(action.name, stopped=reason)
                            else:
                                changed = run_ddl(self.engine, action, self.options, budget)
                                done = PassResult(action.name, complete=True, schema_change=True,
                                                  changed=changed)
                        else:
                            done = run_pass(self.engine, milestone.name, action, run_id, self.options,
                                            budget)
                        result.passes.append(done)
                        if not done.complete:
                            result.stopped = done.stopped
                            break
                        after_action(len(result.passes))
            except KeyboardInterrupt:
                self._finish(result, "interrupted", "aborted during a batch; that batch was rolled back")
                raise Interrupted(
                    f"Aborted: {milestone.name} stopped during a batch, which was rolled back",
                    "run the same command again to resume from the last completed batch",
                ) from None
            except ToolkitError as exc:
                self._finish(result, "failed", exc.one_line())
                raise
            except Exception as exc:
                self._finish(result, "failed", redact(f"{type(exc).__name__}: {exc}"))
                raise
            if result.stopped == "interrupted":
                self._finish(result, "interrupted")
                raise Interrupted(
                    f"Stopped {milestone.name} at a batch boundary after {result.rows} rows",
                    "run the same command again to resume from where it stopped",
                    details={"passes": [p.__dict__ for p in result.passes]},
                )
            return result

    def take_baseline(self, milestone: Milestone) -> None:
        """The fingerprint ``verify`` compares with, taken when the milestone starts (once per
        attempt: a resumed run keeps the one its first run took)."""
        with self.engine.connect() as conn:
            ensure_own_tables(conn)
            if baselines.load(conn, milestone.name) is not None:
                return
        out.say(f"Taking the fingerprint of the ML data before {milestone.name} ...")
        fingerprint = read_with_retries(self.engine, f"fingerprint before {milestone.name}",
                                        ML_TABLE_NAMES, self.options, take)
        with self.engine.connect() as conn:
            baselines.save(conn, milestone.name, fingerprint, None)

    def _finish(self, result: ApplyResult, outcome: str, error: str | None = None) -> None:
        with self.engine.connect() as conn:
            state.finish_run(conn, result.run_id, outcome, {p.name: p.rows for p in result.passes}, error)


@contextmanager
def _stop_on_signals(budget: Budget) -> Iterator[None]:
    """First Ctrl-C (or SIGTERM): finish the current batch, then stop. Second: abort it now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if budget.stop_requested:
            raise KeyboardInterrupt
        budget.stop_requested = True
        out.warn("stopping after the current batch (Ctrl-C again aborts it; it would be rolled back)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
