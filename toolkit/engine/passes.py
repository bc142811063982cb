"""How a run walks its passes: the budget, the health throttle and `toolkit control`
around them, each pass timed and told as it ends, a milestone's hold before its first drop
(and the ``before_drop`` event there, which a hook may veto).

The runner (runner.py) decides *when* passes run and records the run; this walks them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from toolkit.engine import state
from toolkit.engine.actions import Action, ActionRun
from toolkit.engine.batches import after_action
from toolkit.engine.budget import Budget
from toolkit.engine.control import Steering
from toolkit.engine.control import hold as hold_before
from toolkit.engine.events import Events, emit, subscribed
from toolkit.engine.lease import Hold
from toolkit.engine.plan import Milestone
from toolkit.engine.results import ApplyResult, PassResult, timed
from toolkit.engine.settings import RunOptions
from toolkit.engine.signals import stop_on_signals
from toolkit.engine.throttle import Throttle

# Told each action's result as soon as it is over (a pass finished, stopped, or finished
# before), so a person sees it then, and sees it even when the run is stopped later.
OnPass = Callable[[PassResult], None]


@dataclass
class PassRunner:
    """Walks one run's passes under its budget; ``on_commit`` is told each committed batch
    (rewind.Memory.remember)."""

    engine: Engine
    options: RunOptions
    events: Events
    on_commit: Callable[..., None] | None = None
    # The run's `toolkit control` reader once it runs: the closing verify reads requests too
    steering: Steering | None = None

    def run(self, hold: Hold, milestone: Milestone, result: ApplyResult, passes: list[Action],
            before: Callable[[Milestone, int], None] | None = None,
            finished: dict[str, state.Checkpoint] | None = None,
            on_pass: OnPass | None = None) -> None:
        """``before`` (the baseline fingerprint) runs first, timed as its own phase; then the
        passes, in order, until one does not complete."""
        budget = Budget(self.options, events=self.events, on_commit=self.on_commit)
        budget.throttle = self._throttle(budget)
        budget.control = Steering(self.engine, result.run_id, self.options, budget)
        budget.control.start()
        self.steering = budget.control
        with stop_on_signals(budget):
            if before is not None:
                emit(self.events, "phase", run_id=result.run_id, milestone=milestone.name,
                     phase="fingerprint")
                with timed(result, "fingerprint"):
                    before(milestone, result.run_id)
            try:
                self._run_actions(hold, milestone.hold_point, result, passes, budget, finished or {},
                                  on_pass)
            finally:
                result.controls = budget.control.taken
                if budget.throttle is not None:
                    result.throttled_seconds = budget.throttle.totals()

    def _throttle(self, budget: Budget) -> Throttle | None:
        """The run's health throttle (throttle.py), started: it warns now about the signals
        this role cannot read. None with --no-throttle."""
        if self.options.no_throttle:
            return None
        throttle = Throttle(self.engine, self.options, budget)  # the options are its limits
        throttle.start()
        return throttle

    def _run_actions(self, hold: Hold, hold_point: str | None, result: ApplyResult,
                     passes: list[Action], budget: Budget, finished: dict[str, state.Checkpoint],
                     on_pass: OnPass | None) -> None:
        run = ActionRun(self.engine, result.milestone.name, result.run_id, self.options, budget,
                        hold.check)
        emit(self.events, "phase", run_id=result.run_id, milestone=result.milestone.name, phase="apply")
        for action in passes:
            began = time.perf_counter()
            if action.name in finished:  # by an earlier run of this attempt: not walked again
                done = PassResult(action.name, complete=True, changed=False,
                                  finished_before=finished[action.name].rows_done)
            else:
                if action.name == hold_point and not self._held(action, budget, result):
                    result.stopped = budget.exhausted_reason() or "interrupted"
                    break
                done = action.execute(run)
            done.seconds = time.perf_counter() - began
            self._passed(result, done, on_pass)
            if not done.complete:
                result.stopped = done.stopped
                break
            after_action(len(result.passes))

    def _passed(self, result: ApplyResult, done: PassResult, on_pass: OnPass | None) -> None:
        """A pass is over: counted in the run's result, told as an event and to ``on_pass``."""
        result.timings["apply"] = result.timings.get("apply", 0.0) + done.seconds
        result.passes.append(done)
        emit(self.events, "pass_end", run_id=result.run_id, milestone=result.milestone.name,
             pass_name=done.name, rows=done.rows, batches=done.batches, complete=done.complete,
             stopped=done.stopped, schema_change=done.schema_change, changed=done.changed,
             seconds=round(done.seconds, 3), wal_bytes=done.wal_bytes)
        if on_pass is not None:
            on_pass(done)

    def _held(self, action: Action, budget: Budget, result: ApplyResult) -> bool:
        """Before the milestone's first drop (unless it is done already): with
        --hold-before-drop or --hold-flag-file, wait; then tell the events ``before_drop``
        (``--hooks-dir``'s on-before-drop may veto it by raising). True to go on, False
        when aborted or stopped."""
        o = self.options
        holding = bool(o.hold_before_drop or o.hold_flag_file)
        if not (holding or subscribed(self.events)):
            return True
        with self.engine.connect() as conn:
            done = action.is_done(conn)
            conn.rollback()
        if done:
            return True
        assert budget.control is not None, "a run is steered from its start (run_passes)"
        if holding and not hold_before(budget.control, o.hold_flag_file):
            return False
        emit(self.events, "before_drop", run_id=result.run_id, milestone=result.milestone.name,
             pass_name=action.name)
        return True
