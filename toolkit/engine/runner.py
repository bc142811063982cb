"""When steps run and what a run writes: the gate and preconditions checked under the runner
lock, history, the baseline fingerprint, resuming, reconnecting, the closing verify.

The runner is the only place that decides *when* a step's passes execute; the steps say
*what* changes, the batch loop says *how*, and everything it reads before and after
writing it asks the inspector (inspection.py), which ``plan``, ``verify`` and ``status``
use alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.conninfo import render as render_url
from toolkit.db_errors import classify
from toolkit.engine import baselines, fenced, resume, state, writer
from toolkit.engine.actions import Action
from toolkit.engine.batches import read_with_retries
from toolkit.engine.control import Steering
from toolkit.engine.events import LOGGED, Events, emit
from toolkit.engine.health import check_throttle_query
from toolkit.engine.history import RunHistory, error_text
from toolkit.engine.inspection import Inspector
from toolkit.engine.lease import Hold
from toolkit.engine.live import Recorded
from toolkit.engine.passes import OnPass, PassRunner
from toolkit.engine.plan import Milestone, MilestonePlan
from toolkit.engine.preflight import check_privileges, check_writable
from toolkit.engine.reconnect import reconnecting
from toolkit.engine.results import ApplyResult, Check, MilestoneState, Outcome, VerifyResult, timed
from toolkit.engine.rewind import Memory, said
from toolkit.engine.settings import LockWait, RunOptions
from toolkit.errors import (
    DatabaseProblem,
    LockUnavailable,
    ResourceExhausted,
    SessionLost,
    ToolkitError,
)
from toolkit.pooling import refuse_transaction_pooling
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.schema.migrations import ensure_own_tables
from toolkit.schema.own import SCHEMA
from toolkit.verify.fingerprint import Scope, take

GoAhead = Callable[[], None]


class Runner:
    """Applies and rolls back the milestones of the plan it is given, and tells what it does
    to ``events``. What it reads, it reads through :attr:`inspector`."""

    def __init__(self, engine: Engine, options: RunOptions | None = None, *, plan: MilestonePlan,
                 command: str = "", lock_wait_s: float = LockWait.lock_wait_s, events: Events = LOGGED):
        self.engine = engine
        self.milestones = plan
        events = Recorded(events, engine)  # what `toolkit status` shows, kept in the database
        self.events = events
        self.options = options or RunOptions()
        self.command = command
        self.lock_wait_s = lock_wait_s
        self.inspector = Inspector(engine, plan, events)
        self.history = RunHistory(engine, self.options, events, command)
        self.memory = Memory()  # the batches this process committed, across --reconnect attempts
        self._memory_loaded = False
        self.passes = PassRunner(engine, self.options, events, on_commit=self.memory.remember)

    def migrate(self, milestone: Milestone, *, verify_after: bool = True,
                go_ahead: GoAhead | None = None, on_pass: OnPass | None = None) -> ApplyResult:
        """Apply ``milestone``. ``go_ahead`` runs once the gate and the preconditions hold and
        before anything is written (it raises to refuse), so an operator is never asked to
        confirm a run that would be refused anyway; a reconnected attempt does not ask again.
        ``on_pass`` is told each pass's and schema change's result as it ends."""
        return reconnecting(self.engine, self.options, self.events, self.memory,
            lambda first: self._migrate_once(milestone, verify_after, go_ahead if first else None, on_pass))

    def rollback(self, milestone: Milestone, *, go_ahead: GoAhead | None = None,
                 on_pass: OnPass | None = None) -> tuple[ApplyResult, list[Check]]:
        """Undo ``milestone`` from its ledgers and archive; the checks say whether it is undone."""
        return reconnecting(self.engine, self.options, self.events, self.memory,
            lambda first: self._rollback_once(milestone, go_ahead if first else None, on_pass))

    # -- before a run ----------------------------------------------------------------
    def _prepare_write(self, milestone: Milestone) -> None:
        with self.engine.connect() as conn:
            self.inspector.check_reads(conn, milestone.reads)
            check_writable(conn)
            check_privileges(conn, milestone.updates, milestone.reads)
            conn.rollback()
        if self.options.throttle_query and not self.options.no_throttle:
            # before the run is recorded: a usage error leaves no failed run behind
            check_throttle_query(self.engine, self.options.throttle_query)

    def _check_writer(self, conn: Connection, milestone: Milestone, verb: str, left_as: str) -> None:
        """Before the run records itself: refuse to resume what another toolkit version (or
        other write options) left unfinished (writer.py). Checked against the run that left
        the milestone so, which a refused run therefore does not replace."""
        if resume.resumes(left_as, verb):
            left_by = state.milestone_state(conn, milestone.name).get("last_run_id")
            writer.check(conn, milestone.name, verb, left_by, self.options.as_dict(),
                         self.options.resume_with_this_version)

    # -- migrate ---------------------------------------------------------------------
    def _migrate_once(self, milestone: Milestone, verify_after: bool,
                      go_ahead: GoAhead | None, on_pass: OnPass | None) -> ApplyResult:
        refuse_transaction_pooling(self.engine)  # first: statement pooling refuses a transaction
        self.inspector.refuse_out_of_order(milestone, "migrate")
        self._prepare_write(milestone)
        with Hold(self.engine, f"toolkit migrate {milestone.name}", self.lock_wait_s, self.events) as hold:
            with self.inspector.read_only() as conn:
                gate = self.inspector.gate(conn, milestone)
            if not gate.ok:
                raise gate.refusal(milestone)
            if go_ahead is not None:
                go_ahead()
            with self.inspector.read_only() as conn:
                final = milestone.final_now(conn)
                left_as = state.milestone_state(conn, milestone.name)["state"]
                if not final:
                    self._check_writer(conn, milestone, "migrate", left_as)
            # Final (milestone 4 after its archive drop): everything is applied and the passes
            # that build the archive cannot run again; what is left is to verify and say so.
            passes = [] if final else [p for step in milestone.steps for p in step.forward()]
            with self.history.recorded(hold, milestone, "migrate", MilestoneState.IN_PROGRESS) as result:
                self._went_back(result)
                finished = self._take_up(milestone, "migrate", passes, left_as)
                self.passes.run(hold, milestone, result, passes, before=self.take_baseline,
                                finished=finished, on_pass=on_pass)
                if result.complete:
                    self._applied(result, verify_after)
                result.outcome = (
                    Outcome.PARTIAL if not result.complete else
                    Outcome.VERIFICATION_FAILED if result.verify and not result.verify.ok
                    else Outcome.SUCCEEDED)
        return result

    def _applied(self, result: ApplyResult, verify_after: bool) -> None:
        """Every pass of a migrate completed: recorded applied, then verified if it verifies."""
        milestone = self.milestones.get(result.milestone.name)
        self._set_state(milestone, MilestoneState.APPLIED, result.run_id)
        if not verify_after:
            return
        emit(self.events, "phase", run_id=result.run_id, milestone=milestone.name, phase="verify")
        with timed(result, "verify"):
            result.verify = self._steered_verify(milestone)
        if result.verify is None:  # aborted: applied, not verified
            result.stopped = _why_verify_stopped(self.passes.steering)
        elif result.verify.ok:
            self._set_state(milestone, MilestoneState.VERIFIED, result.run_id)

    def _steered_verify(self, milestone: Milestone) -> VerifyResult | None:
        """The closing verify, steered as the batches are: `toolkit control` requests are
        read before each step's checks, before the comparison with the fingerprint and after
        it (before the milestone is recorded verified). A pause lets go of the verify's
        snapshot (holding one open would hold back vacuum on every table), waits as a pause
        between batches does, and the verify starts again after the resume; an abort
        returns None: the milestone stays applied, the next run verifies it."""
        control = self.passes.steering
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
            return self.inspector.verify(milestone, between)
        except (ToolkitError, DBAPIError) as exc:
            problem = (exc if isinstance(exc, ToolkitError)
                       else classify(exc, render_url(self.engine.url), self.events.secrets))
            kind = (type(problem) if isinstance(problem, SessionLost | LockUnavailable | ResourceExhausted)
                    else DatabaseProblem)
            raise kind(
                f"{milestone.name} is applied, but its closing verify did not finish: {problem.problem}",
                f"run `toolkit verify {milestone.name}` (--read-timeout raises the time a read may "
                "take); nothing needs applying again") from exc

    # -- rollback --------------------------------------------------------------------
    def _rollback_once(self, milestone: Milestone, go_ahead: GoAhead | None,
                       on_pass: OnPass | None) -> tuple[ApplyResult, list[Check]]:
        refuse_transaction_pooling(self.engine)
        self.inspector.refuse_out_of_order(milestone, "rollback")
        self._prepare_write(milestone)
        with Hold(self.engine, f"toolkit rollback {milestone.name}", self.lock_wait_s, self.events) as hold:
            self.inspector.refuse_out_of_order(milestone, "rollback")  # again, now that no run can start
            if go_ahead is not None:
                go_ahead()
            passes = [p for step in reversed(milestone.steps) for p in step.backward()]
            with self.inspector.read_only() as conn:
                left_as = state.milestone_state(conn, milestone.name)["state"]
                if passes:
                    self._check_writer(conn, milestone, "rollback", left_as)
            checks: list[Check] = []
            with self.history.recorded(hold, milestone, "rollback", MilestoneState.ROLLING_BACK) as result:
                self._went_back(result)
                finished = self._take_up(milestone, "rollback", passes, left_as)
                self.passes.run(hold, milestone, result, passes, finished=finished, on_pass=on_pass)
                if result.complete:
                    checks = self._rolled_back(result)
                result.outcome = Outcome.PARTIAL if not result.complete else (
                    Outcome.SUCCEEDED if all(c.ok for c in checks) else Outcome.VERIFICATION_FAILED)
        return result, checks

    def _rolled_back(self, result: ApplyResult) -> list[Check]:
        """Every pass of a rollback completed: its checks, and the comparison with the baseline
        (forgotten once the data is back as it was), then recorded rolled back."""
        milestone = self.milestones.get(result.milestone.name)
        emit(self.events, "phase", run_id=result.run_id, milestone=milestone.name, phase="checks")
        with timed(result, "checks"), self.inspector.read_only() as conn:
            checks = [c for step in milestone.steps for c in step.rollback_checks(conn)]
            back = baselines.checks_against_baseline(conn, milestone.name, rolled_back=True,
                                                     fixes=milestone.fixes)
        checks += back
        with self.engine.connect() as conn:
            if all(c.ok for c in back):  # kept otherwise: the next attempt compares with it
                baselines.forget(conn, milestone.name)
            state.clear_checkpoints(conn, milestone.name)
            fenced.commit(conn)
        self._set_state(milestone, MilestoneState.ROLLED_BACK, result.run_id)
        return checks

    # -- outside the milestones ------------------------------------------------------
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
                fenced.commit(conn)
            outcome, error = Outcome.FAILED, None
            try:
                yield run_id
                outcome = Outcome.SUCCEEDED
            except ToolkitError as exc:
                error = exc.one_line()
                raise
            except Exception as exc:
                error = error_text(exc, self.events.secrets)
                raise
            finally:
                self.history.record_end(run_id, outcome, {}, error)

    # -- during a run ----------------------------------------------------------------
    def _take_up(self, milestone: Milestone, verb: str, passes: list[Action],
                 left_as: str) -> dict[str, state.Checkpoint]:
        """A run that resumes says where, and returns the passes an earlier run of this
        attempt finished (not walked again); one that does not resume starts every pass
        afresh (engine/resume.py)."""
        with self.engine.connect() as conn:
            found = resume.prepare(conn, milestone.name, verb, passes, resume.resumes(left_as, verb))
            fenced.commit(conn)
        if found is None:
            return {}
        self.events.say(found.line())
        return found.finished

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
            fenced.commit(conn)
        if report is not None:
            self.events.warn(said(result.milestone.name, report))

    def _set_state(self, milestone: Milestone, name: MilestoneState, run_id: int) -> None:
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
