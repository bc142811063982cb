"""When steps run: dry runs in a read-only snapshot, gates, the runner lock, history, signals.

The runner is the only place that decides *when* a step's passes execute; the steps say
*what* changes, the batch loop says *how*.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.conninfo import render as render_url
from toolkit.db import READ_ONLY_OPTION, cannot_connect, classify, session_lost
from toolkit.engine import resume, state, writer
from toolkit.engine.actions import Action, ActionRun
from toolkit.engine.batches import (
    Budget,
    PassResult,
    RunOptions,
    after_action,
    read_with_retries,
)
from toolkit.engine.control import Steering
from toolkit.engine.control import hold as hold_before
from toolkit.engine.events import LOGGED, Events, emit
from toolkit.engine.health import Limits, Throttle, check_throttle_query
from toolkit.engine.history import RunHistory, error_text
from toolkit.engine.lease import Hold, HoldLost
from toolkit.engine.ledger import refuse_lost_ledger
from toolkit.engine.listing import count_of
from toolkit.engine.live import Recorded
from toolkit.engine.outcomes import ApplyResult, Gate, PlanResult, VerifyResult, timed
from toolkit.engine.plan import Final, Milestone, MilestonePlan
from toolkit.engine.pooling import refuse_transaction_pooling
from toolkit.engine.preflight import (
    check_gitlab_database,
    check_gitlab_schema,
    check_privileges,
    check_writable,
)
from toolkit.engine.results import Check
from toolkit.engine.rewind import Memory, said
from toolkit.engine.signals import stop_on_signals
from toolkit.engine.undo_plan import UndoPlan, undo_plan
from toolkit.errors import (
    DatabaseProblem,
    LockUnavailable,
    PreconditionRefused,
    ResourceExhausted,
    SessionLost,
    ToolkitError,
)
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.schema.migrations import ensure_own_tables, own_schema_exists
from toolkit.schema.own import SCHEMA
from toolkit.verify import baselines
from toolkit.verify.digest import Memo
from toolkit.verify.fingerprint import Scope, take

T = TypeVar("T")
MAX_RECONNECT_DELAY_S = 30.0
# Told each action's result as soon as it is over (a pass finished, stopped, or finished
# before), so a person sees it then, and sees it even when the run is stopped later.
OnPass = Callable[[PassResult], None]


class Runner:
    """Runs the milestones of the plan it is given, and tells what it does to ``events``."""

    def __init__(self, engine: Engine, options: RunOptions | None = None, *, plan: MilestonePlan,
                 command: str = "", lock_wait_s: float = 10.0, events: Events = LOGGED):
        self.engine = engine
        self.milestones = plan
        events = Recorded(events, engine)  # what `toolkit status` shows, kept in the database
        self.events = events
        self.options = options or RunOptions()
        self.command = command
        self.lock_wait_s = lock_wait_s
        self.history = RunHistory(engine, self.options, events, command)
        self._ledger_checked = False
        self.memory = Memory()  # the batches this process committed, across --reconnect attempts
        self.steering: Steering | None = None  # the run's `toolkit control` reader, once it runs
        self._memory_loaded = False

    def _refuse_lost_ledger(self, conn: Connection) -> None:
        """Once per runner, before its first read: a toolkit schema lost while GitLab's
        tables show milestones in place is named, and every command refused (ledger.py)."""
        if not self._ledger_checked:
            refuse_lost_ledger(conn, self.milestones)
            self._ledger_checked = True

    # -- read-only -------------------------------------------------------------------
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

    def _check_reads(self, conn: Connection, tables: tuple[str, ...]) -> None:
        """The tables a milestone reads are there with their columns, but for what a started
        milestone drops on purpose (the plan says which)."""
        check_gitlab_schema(conn, tables, may_be_gone=self.milestones.may_be_gone(conn))

    def plan(self, milestone: Milestone) -> PlanResult:
        with self.read_only() as conn:
            self._check_reads(conn, milestone.reads)
            steps = milestone.plan(conn)
            gate = self._gate(conn, milestone)
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
        verify: :meth:`_steered_verify`)."""
        results = []
        memo: Memo = {}
        with self.read_only() as conn:
            for milestone in chosen:
                self._check_reads(conn, milestone.reads)
                checks = milestone.verify(conn, between)
                if between is not None:
                    between()
                checks += baselines.checks_against_baseline(
                    conn, milestone.name, changes=milestone.changes,
                    compare_tables=not self._later_started(conn, milestone), memo=memo,
                    fixes=milestone.fixes)
                if between is not None:
                    between()
                results.append(VerifyResult(milestone, checks))
        return results

    def _later_started(self, conn: Connection, milestone: Milestone) -> list[str]:
        return [m.name for m in self.milestones.later(milestone)
                if state.milestone_state(conn, m.name)["state"]
                in state.STARTED]

    def _gate(self, conn: Connection, milestone: Milestone) -> Gate:
        previous = self.milestones.previous(milestone)
        failures: list[Check] = []
        if previous is not None:
            self._check_reads(conn, previous.reads)
            failures = [c for c in previous.verify(conn) if not c.ok]
        if milestone.preconditions is not None:
            failures += [c for c in milestone.preconditions(conn) if not c.ok]
        return Gate(not failures, previous.name if previous else None, failures)

    def states(self) -> dict[str, str]:
        """Each milestone's recorded state, read-only; refused when the database is not
        GitLab's (its states would all be 'not started')."""
        with self.read_only() as conn:
            self.check_gitlab(conn)
            return {name: state.milestone_state(conn, name)["state"] for name in self.milestones.names}

    def status(self) -> list[dict[str, Any]]:
        report = []
        with self.read_only() as conn:
            for milestone in self.milestones:
                self._check_reads(conn, milestone.reads)
                recorded = state.milestone_state(conn, milestone.name)
                final = milestone.final_now(conn)
                # A final milestone has nothing left to undo: a rollback could never finish.
                undoing = recorded["state"] == state.ROLLING_BACK and final is None
                report.append({
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
                    "left_to_undo": [
                        f"{c.name}: not yet" + (f" ({count_of(c.rows)} left)" if c.rows else "")
                        for step in milestone.steps for c in step.rollback_checks(conn) if not c.ok]
                    if undoing else [],
                    "final": final.as_dict() if final else None,
                })
                if undoing and (kept := sum(s.schema_changes - s.schema_changes_left(conn)
                                            for s in milestone.steps)):
                    report[-1]["left_to_undo"].append(f"{kept} schema changes still in place")
        return report

    # -- writes ----------------------------------------------------------------------
    def _prepare_write(self, milestone: Milestone) -> None:
        with self.engine.connect() as conn:
            self._check_reads(conn, milestone.reads)
            check_writable(conn)
            check_privileges(conn, milestone.updates, milestone.reads)
            conn.rollback()
        if self.options.throttle_query and not self.options.no_throttle:
            # before the run is recorded: a usage error leaves no failed run behind
            check_throttle_query(self.engine, self.options.throttle_query)

    def migrate(self, milestone: Milestone, *, verify_after: bool = True,
                go_ahead: Callable[[], None] | None = None, on_pass: OnPass | None = None) -> ApplyResult:
        """Apply ``milestone``. ``go_ahead`` runs once the gate and the preconditions hold and
        before anything is written (it raises to refuse), so an operator is never asked to
        confirm a run that would be refused anyway; a reconnected attempt does not ask again.
        ``on_pass`` is told each pass's and schema change's result as it ends."""
        return self._reconnecting(
            lambda first: self._migrate_once(milestone, verify_after, go_ahead if first else None, on_pass))

    def rollback(self, milestone: Milestone, *, go_ahead: Callable[[], None] | None = None,
                 on_pass: OnPass | None = None) -> tuple[ApplyResult, list[Check]]:
        return self._reconnecting(
            lambda first: self._rollback_once(milestone, go_ahead if first else None, on_pass))

    def final(self, milestone: Milestone) -> tuple[Final | None, str]:
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

    def _refuse_out_of_order(self, milestone: Milestone, verb: str) -> None:
        """Before any other check: a later milestone in the way is the one thing to say (after
        milestone 4 the tables the other checks read are gone). A milestone that is final (or
        a final one in the way) is refused too, naming why: its rollback could never succeed."""
        with self.read_only() as conn:
            refusal = self._out_of_order(conn, milestone, verb)
        if refusal is not None:
            raise refusal

    def _out_of_order(self, conn: Connection, milestone: Milestone, verb: str) -> PreconditionRefused | None:
        """The refusal :meth:`_refuse_out_of_order` raises, read in ``conn``; None when in order."""
        started = self._later_started(conn, milestone)
        undoing = [name for name in started
                   if state.milestone_state(conn, name)["state"] == state.ROLLING_BACK]
        if verb == "migrate":
            started = [name for name in started if self.milestones.get(name).drops]
        in_the_way = [milestone] if verb == "rollback" else []
        in_the_way += [self.milestones.get(name) for name in started]
        final = next(((m, f) for m in in_the_way if (f := m.final_now(conn)) is not None), None)
        if final is not None:
            what = "be rolled back" if verb == "rollback" else "be migrated again"
            final_one, why = final
            problem = (f"{milestone.name} cannot be rolled back: {why.why}" if final_one is milestone
                       else f"{milestone.name} cannot {what}: {final_one.name} is final, "
                            f"{why.why}, so it cannot be rolled back first")
            return PreconditionRefused(problem, why.instead, details={"final": final_one.name, **why.details})
        if started:
            plural = "are" if len(started) > 1 else "is"
            where = "applied" if not set(undoing) & set(started) else (
                "being rolled back" if set(started) <= set(undoing) else "applied or being rolled back")
            what = "be rolled back" if verb == "rollback" else "be migrated again"
            return PreconditionRefused(
                f"{milestone.name} cannot {what} while {_and(started)} {plural} {where}",
                f"roll back in reverse order: `toolkit rollback {started[-1]}` first",
                details={"applied": started},
            )
        return None

    def rollback_plan(self, milestone: Milestone) -> UndoPlan:
        """What ``rollback`` would restore and remove, counted from the ledgers and the archive
        without writing anything (``rollback --dry-run``). Refused where the rollback itself
        would be: a later milestone in the way, or this one final."""
        with self.read_only() as conn:
            if (refusal := self._out_of_order(conn, milestone, "rollback")) is not None:
                raise refusal
            self._check_reads(conn, milestone.reads)
            now = state.milestone_state(conn, milestone.name)["state"]
            if not own_schema_exists(conn):  # the toolkit never ran here: no ledger to undo
                return UndoPlan(milestone, now, [])
            actions = [a for step in reversed(milestone.steps) for a in step.backward()]
            return undo_plan(conn, milestone, now, actions)

    def _migrate_once(self, milestone: Milestone, verify_after: bool,
                      go_ahead: Callable[[], None] | None, on_pass: OnPass | None) -> ApplyResult:
        refuse_transaction_pooling(self.engine)  # first: statement pooling refuses a transaction
        self._refuse_out_of_order(milestone, "migrate")
        self._prepare_write(milestone)
        with Hold(self.engine, f"toolkit migrate {milestone.name}", self.lock_wait_s, self.events) as hold:
            with self.read_only() as conn:
                gate = self._gate(conn, milestone)
            if not gate.ok:
                raise gate.refusal(milestone)
            if go_ahead is not None:
                go_ahead()
            with self.read_only() as conn:
                final = milestone.final_now(conn)
                left_as = state.milestone_state(conn, milestone.name)["state"]
                if not final:
                    self._check_writer(conn, milestone, "migrate", left_as)
            # Final (milestone 4 after its archive drop): everything is applied and the passes
            # that build the archive cannot run again; what is left is to verify and say so.
            passes = [] if final else [p for step in milestone.steps for p in step.forward()]
            with self.history.recorded(hold, milestone, "migrate", state.IN_PROGRESS) as result:
                self._went_back(result)
                finished = self._take_up(milestone, "migrate", passes, left_as)
                self._run_passes(hold, result, passes, before=self.take_baseline, finished=finished,
                                 on_pass=on_pass)
                if result.complete:
                    self._set_state(milestone, state.APPLIED, result.run_id)
                    if verify_after:
                        emit(self.events, "phase", run_id=result.run_id, milestone=milestone.name,
                             phase="verify")
                        with timed(result, "verify"):
                            result.verify = self._steered_verify(milestone)
                        if result.verify is None:  # aborted: applied, not verified
                            result.stopped = _why_verify_stopped(self.steering)
                        elif result.verify.ok:
                            self._set_state(milestone, state.VERIFIED, result.run_id)
                result.outcome = (
                    "partial" if not result.complete else
                    "verification_failed" if result.verify and not result.verify.ok else "succeeded")
        return result

    def _steered_verify(self, milestone: Milestone) -> VerifyResult | None:
        """The closing verify, steered as the batches are: `toolkit control` requests are
        read before each step's checks, before the comparison with the fingerprint and after
        it (before the milestone is recorded verified). A pause lets go of the verify's
        snapshot (holding one open would hold back vacuum on every table), waits as a pause
        between batches does, and the verify starts again after the resume; an abort
        returns None: the milestone stays applied, the next run verifies it."""
        control = self.steering
        if control is None:
            return self._closing_verify(milestone)

        def between() -> None:
            control.poll()
            if control.paused is not None or control.aborted is not None:
                raise _Steered

        while True:
            try:
                return self._closing_verify(milestone, between)
            except _Steered:
                control.boundary()  # waits while paused, until a resume, an abort or a stop
                if control.aborted is not None or control.budget.stop_requested:
                    return None

    def _closing_verify(self, milestone: Milestone,
                        between: Callable[[], None] | None = None) -> VerifyResult:
        """The verify a migrate ends with. If it cannot finish, the milestone stays recorded
        as applied (true: every batch committed) and the message says only verify is left."""
        try:
            return self.verify(milestone, between)
        except (ToolkitError, DBAPIError) as exc:
            problem = (exc if isinstance(exc, ToolkitError)
                       else classify(exc, render_url(self.engine.url), self.events.secrets))
            kind = (type(problem) if isinstance(problem, SessionLost | LockUnavailable | ResourceExhausted)
                    else DatabaseProblem)
            raise kind(
                f"{milestone.name} is applied, but its closing verify did not finish: {problem.problem}",
                f"run `toolkit verify {milestone.name}` (--read-timeout raises the time a read may "
                "take); nothing needs applying again") from exc

    def _rollback_once(self, milestone: Milestone, go_ahead: Callable[[], None] | None,
                       on_pass: OnPass | None) -> tuple[ApplyResult, list[Check]]:
        refuse_transaction_pooling(self.engine)
        self._refuse_out_of_order(milestone, "rollback")
        self._prepare_write(milestone)
        with Hold(self.engine, f"toolkit rollback {milestone.name}", self.lock_wait_s, self.events) as hold:
            self._refuse_out_of_order(milestone, "rollback")  # again, now that no run can start
            if go_ahead is not None:
                go_ahead()
            passes = [p for step in reversed(milestone.steps) for p in step.backward()]
            with self.read_only() as conn:
                left_as = state.milestone_state(conn, milestone.name)["state"]
                if passes:
                    self._check_writer(conn, milestone, "rollback", left_as)
            checks: list[Check] = []
            with self.history.recorded(hold, milestone, "rollback", state.ROLLING_BACK) as result:
                self._went_back(result)
                finished = self._take_up(milestone, "rollback", passes, left_as)
                self._run_passes(hold, result, passes, finished=finished, on_pass=on_pass)
                if result.complete:
                    emit(self.events, "phase", run_id=result.run_id, milestone=milestone.name,
                         phase="checks")
                    with timed(result, "checks"), self.read_only() as conn:
                        checks = [c for step in milestone.steps for c in step.rollback_checks(conn)]
                        back = baselines.checks_against_baseline(conn, milestone.name, rolled_back=True,
                                                                 fixes=milestone.fixes)
                    checks += back
                    with self.engine.connect() as conn:
                        if all(c.ok for c in back):  # kept otherwise: the next attempt compares with it
                            baselines.forget(conn, milestone.name)
                        state.clear_checkpoints(conn, milestone.name)
                        conn.commit()
                    self._set_state(milestone, state.ROLLED_BACK, result.run_id)
                result.outcome = "partial" if not result.complete else (
                    "succeeded" if all(c.ok for c in checks) else "verification_failed")
        return result, checks

    @contextmanager
    def exclusive(self, command: str, milestone: str | None = None) -> Iterator[int]:
        """A small write outside the milestones (``archive drop``, ``fingerprint --baseline``)
        under the same hold as a run: the runner lock, the fenced lease, a history row.
        Yields the run id; the body's commits are fenced like a batch's."""
        refuse_transaction_pooling(self.engine)
        with Hold(self.engine, command, self.lock_wait_s, self.events) as hold:
            with self.engine.connect() as conn:
                ensure_own_tables(conn)
                hold.claim(conn)
                run_id = state.start_run(conn, command, milestone, {})
                hold.record_run(conn, run_id)  # its writes are counted like a run's
                conn.commit()
            outcome, error = "failed", None
            try:
                yield run_id
                outcome = "succeeded"
            except ToolkitError as exc:
                error = exc.one_line()
                raise
            except Exception as exc:
                error = error_text(exc, self.events.secrets)
                raise
            finally:
                self.history.record_end(run_id, outcome, {}, error)

    def _reconnecting(self, attempt: Callable[[bool], T]) -> T:
        """Run ``attempt`` and, with ``--reconnect N``, run it again after the database ended
        the session (restart, failover, a terminated session): each attempt resumes from the
        last committed batch, on whichever host is the primary by then."""
        tries = 0
        while True:
            try:
                return attempt(tries == 0)
            except (SessionLost, DBAPIError) as exc:
                why = self._why_retry(exc)
                if why is None or tries >= self.options.reconnect:
                    if why is not None:  # the next run from here checks what this one committed
                        self.memory.save(self.engine.url)
                    raise
            tries += 1
            delay = min(self.options.reconnect_backoff_s * 2 ** (tries - 1), MAX_RECONNECT_DELAY_S)
            self.events.warn(f"{why}; reconnecting in {delay:.1f}s to resume "
                     f"(attempt {tries} of {self.options.reconnect})")
            self.engine.dispose()
            time.sleep(delay)

    @staticmethod
    def _why_retry(exc: Exception) -> str | None:
        if isinstance(exc, HoldLost):
            return None if exc.taken_over else "the runner lock's session ended"
        if isinstance(exc, SessionLost):
            return exc.problem
        if cannot_connect(exc):
            return "the database cannot be reached"
        return session_lost(exc, during_run=True)

    def _check_writer(self, conn: Connection, milestone: Milestone, verb: str, left_as: str) -> None:
        """Before the run records itself: refuse to resume what another toolkit version (or
        other write options) left unfinished (writer.py). Checked against the run that left
        the milestone so, which a refused run therefore does not replace."""
        if resume.resumes(left_as, verb):
            left_by = state.milestone_state(conn, milestone.name).get("last_run_id")
            writer.check(conn, milestone.name, verb, left_by, self.options.as_dict(),
                         self.options.resume_with_this_version)

    def _take_up(self, milestone: Milestone, verb: str, passes: list[Action],
                 left_as: str) -> dict[str, state.Checkpoint]:
        """A run that resumes says where, and returns the passes an earlier run of this
        attempt finished (not walked again); one that does not resume starts every pass
        afresh (engine/resume.py)."""
        with self.engine.connect() as conn:
            found = resume.prepare(conn, milestone.name, verb, passes, resume.resumes(left_as, verb))
            conn.commit()
        if found is None:
            return {}
        self.events.say(found.line())
        return found.finished

    def _run_passes(self, hold: Hold, result: ApplyResult, passes: list[Action],
                    before: Callable[[Milestone, int], None] | None = None,
                    finished: dict[str, state.Checkpoint] | None = None,
                    on_pass: OnPass | None = None) -> None:
        milestone = result.milestone
        budget = Budget(self.options, events=self.events, on_commit=self.memory.remember)
        budget.throttle = self._throttle(budget)
        budget.control = Steering(self.engine, result.run_id, self.options, budget)
        budget.control.start()
        self.steering = budget.control  # the closing verify reads requests too
        with stop_on_signals(budget):
            if before is not None:
                emit(self.events, "phase", run_id=result.run_id, milestone=milestone.name,
                     phase="fingerprint")
                with timed(result, "fingerprint"):
                    before(milestone, result.run_id)
            try:
                self._run_actions(hold, result, passes, budget, finished or {}, on_pass)
            finally:
                result.controls = budget.control.taken
                if budget.throttle is not None:
                    result.throttled_seconds = budget.throttle.totals()

    def _throttle(self, budget: Budget) -> Throttle | None:
        """The run's health throttle (health.py), started: it warns now about the signals
        this role cannot read. None with --no-throttle."""
        o = self.options
        if o.no_throttle:
            return None
        throttle = Throttle(self.engine, Limits(o.max_replica_lag_ms, o.max_replica_lag_bytes,
                                                o.max_transaction_age_s, o.throttle_query,
                                                o.throttle_flag_file, o.max_archive_backlog,
                                                o.max_wal_rate_mb_s),
                            budget, o.max_throttle_s)
        throttle.start()
        return throttle

    def _run_actions(self, hold: Hold, result: ApplyResult, passes: list[Action], budget: Budget,
                     finished: dict[str, state.Checkpoint], on_pass: OnPass | None) -> None:
        run = ActionRun(self.engine, result.milestone.name, result.run_id, self.options, budget,
                        hold.check)
        emit(self.events, "phase", run_id=result.run_id, milestone=result.milestone.name, phase="apply")
        for action in passes:
            began = time.perf_counter()
            if action.name in finished:  # by an earlier run of this attempt: not walked again
                done = PassResult(action.name, complete=True, changed=False,
                                  finished_before=finished[action.name].rows_done)
            else:
                if action.name == result.milestone.hold_point and not self._held(action, budget):
                    result.stopped = budget.exhausted_reason() or "interrupted"
                    break
                done = action.execute(run)
            done.seconds = time.perf_counter() - began
            result.timings["apply"] = result.timings.get("apply", 0.0) + done.seconds
            result.passes.append(done)
            emit(self.events, "pass_end", run_id=result.run_id, milestone=result.milestone.name,
                 pass_name=done.name, rows=done.rows, batches=done.batches, complete=done.complete,
                 stopped=done.stopped, schema_change=done.schema_change, changed=done.changed,
                 seconds=round(done.seconds, 3), wal_bytes=done.wal_bytes)
            if on_pass is not None:
                on_pass(done)
            if not done.complete:
                result.stopped = done.stopped
                break
            after_action(len(result.passes))

    def _held(self, action: Action, budget: Budget) -> bool:
        """With --hold-before-drop or --hold-flag-file, wait before the milestone's first
        drop (unless it is done already): True to go on, False when aborted or stopped."""
        o = self.options
        if not (o.hold_before_drop or o.hold_flag_file):
            return True
        with self.engine.connect() as conn:
            done = action.is_done(conn)
            conn.rollback()
        return done or hold_before(budget.control, o.hold_flag_file)

    def _went_back(self, result: ApplyResult) -> None:
        """An attempt that resumes after a lost session: batches this process committed that
        the database no longer has (a promoted replica had not replayed them) are said, and
        recorded in the run's options (``went_back``), before they are done again."""
        if not self._memory_loaded:  # what an earlier process (exit 75) committed
            self.memory.load(self.engine.url)
            self._memory_loaded = True
        with self.engine.connect() as conn:
            report = self.memory.check(conn, result.milestone.name)
            self.memory.runs.add(result.run_id)
            if report is not None:
                conn.execute(sa.text(f"""
                    UPDATE {SCHEMA}.runs SET options = options || jsonb_build_object(
                        'went_back', CAST(:report AS jsonb)) WHERE id = :id"""),
                    {"report": json.dumps(report), "id": result.run_id})
            conn.commit()
        if report is not None:
            self.events.warn(said(result.milestone.name, report))

    def _set_state(self, milestone: Milestone, name: str, run_id: int) -> None:
        with self.engine.connect() as conn:
            state.set_milestone_state(conn, milestone.name, name, run_id)

    def take_baseline(self, milestone: Milestone, run_id: int | None = None) -> None:
        """The fingerprint ``verify`` compares with, taken when the milestone starts (once per
        attempt: a resumed run keeps the one its first run took).

        Taken by run ``run_id``, it reads only what the milestone can change (the tables it
        updates or drops, the MLflow parts made from them): every other table is proven
        untouched from the rows its runs wrote (engine/writes.py). Without a run (scripts/
        bench.py), everything."""
        with self.engine.connect() as conn:
            ensure_own_tables(conn)  # a no-op inside a run; scripts/bench.py calls this alone
            if baselines.load(conn, milestone.name) is not None:
                return
        def scope(conn: Connection) -> Scope | None:
            """What it reads; with the rows its blocking anomalies name now (in the same
            snapshot), which the operator is told to change by hand."""
            if run_id is None:
                return None
            named = milestone.named(conn) if milestone.named is not None else {}
            parts = {p: f.table for f in milestone.fixes for p in f.parts if f.table in named}
            return Scope.of(milestone.changes, milestone.may_change, run_id, named, parts,
                            milestone.may_change_parts)

        self.events.say(f"Taking the fingerprint of the ML data {milestone.name} can change ...")
        fingerprint = read_with_retries(self.engine, f"fingerprint before {milestone.name}",
                                        ML_TABLE_NAMES, self.options,
                                        lambda conn: take(conn, scope=scope(conn)), self.events)
        with self.engine.connect() as conn:
            baselines.save(conn, milestone.name, fingerprint, run_id)

class _Steered(Exception):
    """A pause or an abort read during the closing verify: its snapshot is let go."""


def _why_verify_stopped(control: Steering | None) -> str:
    """Why a steered verify stopped: ``aborted``, or ``interrupted`` (Ctrl-C while paused)."""
    return "aborted" if control is not None and control.aborted is not None else "interrupted"


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
