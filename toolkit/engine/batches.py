"""A :class:`KeysetPass` and the loop that runs it: short batches, resumable, interruptible.

Each batch is one fenced batch (``fenced.batch``): a transaction that (1) sets its own
``lock_timeout`` and ``statement_timeout``, (2) finds the batch's upper key, (3) runs the
change, (4) writes the checkpoint (and the run's row count), then checks the run's lease,
records the rows it wrote and commits. So a crash at any instant leaves either the whole
batch and its checkpoint or neither, and the next run resumes exactly after the last
committed batch; a run that lost its hold commits nothing.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.db import TIMEOUTS_OPTION
from toolkit.engine import fenced, state
from toolkit.engine.budget import Budget
from toolkit.engine.events import LOGGED, Events, emit
from toolkit.engine.locks import (
    TRANSIENT_STATES,
    UNIQUE_VIOLATION,
    describe_holder,
    table_lock_holders,
)
from toolkit.engine.pausing import pause
from toolkit.engine.results import PassResult
from toolkit.engine.settings import RunOptions
from toolkit.engine.sizing import BatchSizer
from toolkit.errors import LockUnavailable

if TYPE_CHECKING:
    from toolkit.engine.actions import ActionRun

MAX_CATCH_UP_ROUNDS = 5
T = TypeVar("T")

# Read by the engine only, for tests: SIGKILL this process right after the Nth batch commits,
# or right after the Nth action (a DDL change or a whole pass) of a run completes.
FAULT_KILL_AFTER_BATCHES_ENV = "TOOLKIT_FAULT_KILL_AFTER_BATCHES"
FAULT_KILL_AFTER_ACTIONS_ENV = "TOOLKIT_FAULT_KILL_AFTER_ACTIONS"



@dataclass(frozen=True)
class KeysetPass:
    """A data change done in short batches over the primary key of a driving table.

    A pass covers the keys up to the largest one when it started (kept in the checkpoint,
    so a resumed pass has the same end); it never chases rows inserted meanwhile. Each
    batch covers the next keys after the checkpoint (as many as the batch size): the engine finds
    the batch's upper key, then runs ``change_sql`` with ``:lo`` (exclusive) and ``:hi``
    (inclusive) and ``:run_id`` bound; ``change_sql`` returns one row, the number of rows
    it changed. It must be idempotent: a pass restarts from the beginning after it has
    once completed, so rows written late by the application are picked up.
    """

    name: str
    description: str
    driving_table: str
    change_sql: str
    key: str = "id"
    locks: tuple[str, ...] = ()  # tables whose lock holders to name on a lock timeout
    retry_unique_violation: bool = False  # a concurrent insert can race the collision check
    # When the pass reaches its bound, go on up to the new largest key (rows the
    # application inserted meanwhile), a few rounds at most.
    catch_up: bool = False
    # A batch body in Python, for changes SQL alone cannot express (slugs). It must run
    # only the statements ``change_sql`` shows, and return the rows it changed.
    apply: Callable[[Connection, int, int, int], int] | None = field(default=None, compare=False)
    # A query that returns true when there is nothing to walk (the driving table or column
    # is gone, after a crash past the point where it was dropped).
    skip_if_sql: str | None = None
    # Which rows of the driving table can need a change at all (a condition on its
    # columns). Batches then hold ``batch_size`` of those rows rather than of all rows:
    # milestone 1 needs the tenth of candidates that have a package, and a batch of
    # 5000 keys of which 4500 need nothing costs a commit and a checkpoint for little.
    driving_filter: str | None = None
    # For ``rollback --dry-run``: what the pass would change now, read-only, as labelled
    # counts (the first is the rows the pass reports). Without it, the rows of the driving
    # table it would walk (engine/undo_plan.py).
    count: Callable[[Connection], dict[str, int]] | None = field(default=None, compare=False)

    def _where(self) -> str:
        extra = f" AND ({self.driving_filter})" if self.driving_filter else ""
        return f"WHERE {self.key} > :lo AND {self.key} <= :upper{extra}"

    def next_key_sql(self) -> str:
        """The batch's upper key and how many keys it covers (for progress and sizing)."""
        return (f"SELECT max({self.key}), count(*) FROM (SELECT {self.key} FROM {self.driving_table} "
                f"{self._where()} ORDER BY {self.key} LIMIT :size) AS batch")

    def upper_key_sql(self) -> str:
        return f"SELECT COALESCE(max({self.key}), 0) FROM {self.driving_table}"

    def remaining_sql(self) -> str:
        return f"SELECT count(*) FROM {self.driving_table} {self._where()}"

    # -- the action protocol (engine/actions.py) ------------------------------------------
    in_batches = True
    reduces_to_sql = True  # a Python ``apply`` runs only the statements ``change_sql`` shows

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables a pass writes, as far as the engine knows: its driving table, and
        those whose locks it takes."""
        return tuple(dict.fromkeys((self.driving_table, *self.locks)))

    def is_done(self, conn: Connection) -> bool:
        """Nothing left to walk (a pass is idempotent: done means a walk would change 0)."""
        if self.skip_if_sql and conn.execute(sa.text(self.skip_if_sql)).scalar():
            return True
        return not conn.execute(sa.text(self.remaining_sql()), {"lo": 0, "upper": 2**62}).scalar_one()

    def render_sql(self, conn: Connection | None = None) -> str:
        return self.change_sql.strip()

    def how_it_runs(self) -> str:
        bounds = "\n".join(f"--   {line}" for line in self.next_key_sql().splitlines())
        return ("Runs in batches, each one transaction. Batch bounds: :lo (exclusive, the\n"
                f"-- checkpoint) and :hi from\n{bounds}")

    def execute(self, run: ActionRun) -> PassResult:
        return run_pass(run.engine, run.milestone, self, run.run_id, run.options, run.budget)


def sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def run_pass(engine: Engine, milestone: str, kpass: KeysetPass, run_id: int, options: RunOptions,
             budget: Budget) -> PassResult:
    """Walk ``kpass`` from its checkpoint in fenced batches until it is done or the budget
    says stop (its reason in ``stopped``)."""
    result = PassResult(kpass.name)
    with engine.connect() as conn:
        conn = conn.execution_options(**{TIMEOUTS_OPTION: (options.lock_timeout_ms,
                                                           options.statement_timeout_ms)})
        if kpass.skip_if_sql and conn.execute(sa.text(kpass.skip_if_sql)).scalar():
            conn.rollback()
            result.complete = True
            return result
        walk = _Walk(conn, milestone, kpass, run_id, budget, result)
        with budget.events.progress(walk.keys_left(), kpass.name) as bar:
            while (reason := walk.wait_turn()) is None:
                if not walk.next_batch(bar):
                    result.complete = True
                    return result
            result.stopped = reason
            return result


class _Walk:
    """One pass under way: where it is (``lo``, ``upper``) and how large its batches are."""

    def __init__(self, conn: Connection, milestone: str, kpass: KeysetPass, run_id: int,
                 budget: Budget, result: PassResult):
        self.conn, self.milestone, self.kpass, self.run_id = conn, milestone, kpass, run_id
        self.budget, self.options, self.result = budget, budget.options, result
        self.catch_ups = 0
        self.sizer = self._sizer()
        checkpoint = state.read_checkpoint(conn, milestone, kpass.name)
        if checkpoint is None or checkpoint.completed_at is not None or checkpoint.upper_key is None:
            self.lo, self.upper = 0, conn.execute(sa.text(kpass.upper_key_sql())).scalar_one()
            state.restart_checkpoint(conn, milestone, kpass.name, run_id, self.upper)
        else:
            self.lo, self.upper = checkpoint.last_key or 0, checkpoint.upper_key

    def _sizer(self) -> BatchSizer:
        options = self.options
        return BatchSizer(options.batch_size, options.target_batch_ms, options.min_batch_size,
                          options.max_batch_size)

    def keys_left(self) -> int:
        """Count what is left, commit the checkpoint, and say the pass starts."""
        total = int(self.conn.execute(sa.text(self.kpass.remaining_sql()),
                                      {"lo": self.lo, "upper": self.upper}).scalar_one())
        fenced.commit(self.conn)
        emit(self.budget.events, "pass_start", milestone=self.milestone, pass_name=self.kpass.name,
             run_id=self.run_id, key_from=self.lo, key_upper=self.upper, keys=total)
        return total

    def wait_turn(self) -> str | None:
        """At a batch boundary: take `toolkit control` requests, wait for the database's
        health; why to stop now (None: go on)."""
        budget = self.budget
        budget.steer()
        if budget.control is not None and budget.control.resized:
            budget.control.resized = False
            self.sizer = self._sizer()
        if reason := budget.exhausted_reason():
            return reason
        if budget.throttle is not None:
            budget.throttle.wait(self.kpass.tables, self.kpass.name)
            if budget.control is not None and budget.control.paused is not None:
                budget.steer()  # paused during the wait: no batch before the resume
            return budget.exhausted_reason()
        return None

    def next_batch(self, bar: Any) -> bool:
        """One fenced batch (with its retries); False once the pass has reached its end."""
        began = time.perf_counter()
        self.budget.retries = 0
        key_from = self.lo
        hi, changed, scanned, wal = _one_batch(self.conn, self.milestone, self.kpass, self.lo,
                                               self.upper, self.run_id, self.options, self.budget,
                                               self.sizer.size)
        if hi is None:
            return self._caught_up()
        took = time.perf_counter() - began
        self.result.batch_seconds.append(took)
        self.result.batch_sizes.append(scanned)
        self.sizer.record(took, scanned)
        if self.budget.on_commit is not None:
            self.budget.on_commit(self.milestone, self.kpass.name, hi)
        self.lo = hi
        _counted(self.result, self.budget, changed, wal)
        bar.update(scanned, changed)
        emit(self.budget.events, "batch", milestone=self.milestone, pass_name=self.kpass.name,
             run_id=self.run_id, key_from=key_from, key_to=hi, keys=scanned, rows=changed,
             ms=round(took * 1000, 3), retries=self.budget.retries,
             wal_bytes=wal)
        _maybe_inject_fault(self.budget.batches)
        if self.options.pause_ms:
            _pause_between(self.options.pause_ms / 1000, self.budget)
        return True

    def _caught_up(self) -> bool:
        """At the pass's bound: go on up to the keys inserted meanwhile (a few rounds, when
        the pass catches up), or mark the pass complete."""
        conn, kpass = self.conn, self.kpass
        new_upper = conn.execute(sa.text(kpass.upper_key_sql())).scalar_one()
        if kpass.catch_up and new_upper > self.upper and self.catch_ups < MAX_CATCH_UP_ROUNDS:
            self.catch_ups += 1
            self.lo, self.upper = self.upper, new_upper
            state.extend_checkpoint(conn, self.milestone, kpass.name, self.lo, self.upper)
            fenced.commit(conn)
            return True
        state.complete_checkpoint(conn, self.milestone, kpass.name, self.run_id)
        fenced.commit(conn)
        return False


def _counted(result: PassResult, budget: Budget, changed: int, wal: int | None) -> None:
    """A committed batch in the pass's and the run's counts (its rows, its WAL)."""
    result.rows += changed
    result.batches += 1
    budget.batches += 1
    result.wal_bytes += wal or 0


def _one_batch(conn: Connection, milestone: str, kpass: KeysetPass, lo: int, upper: int,
               run_id: int, options: RunOptions, budget: Budget,
               size: int) -> tuple[int | None, int, int, int | None]:
    """One batch in its own transaction: (its last key, rows changed, keys taken, WAL bytes
    since the last checkpoint, read at its own: state.save_checkpoint); None: none left."""
    for attempt in range(options.retries + 1):
        try:
            with fenced.batch(conn, timeouts=(options.lock_timeout_ms, options.statement_timeout_ms)):
                hi, scanned = conn.execute(
                    sa.text(kpass.next_key_sql()), {"lo": lo, "upper": upper, "size": size},
                ).one()
                if hi is None:
                    return None, 0, 0, None
                if kpass.apply is not None:
                    changed = kpass.apply(conn, lo, hi, run_id)
                else:
                    changed = conn.execute(sa.text(kpass.change_sql),
                                           {"lo": lo, "hi": hi, "run_id": run_id}).scalar_one()
                wal = state.save_checkpoint(conn, milestone, kpass.name, hi, changed, run_id, scanned)
            return hi, changed, scanned, wal
        except DBAPIError as exc:
            code = sqlstate(exc)
            retryable = code in TRANSIENT_STATES or (
                code == UNIQUE_VIOLATION and kpass.retry_unique_violation)
            if not retryable:
                raise
            if budget.stop_requested:  # a stop while the batch waited: a stop, not a failure
                raise KeyboardInterrupt from exc
            if attempt == options.retries:
                raise _gave_up(conn, kpass.name, kpass.locks, code, attempt + 1,
                               "the last batch was rolled back") from exc
            delay = options.backoff_s * 2 ** attempt
            budget.retries += 1
            emit(budget.events, "retry", milestone=milestone, pass_name=kpass.name, run_id=run_id,
                 key_from=lo, attempt=attempt + 1, retries=options.retries, sqlstate=code,
                 delay_s=delay)
            what = TRANSIENT_STATES.get(code or "", "unique violation")
            budget.events.warn(f"{kpass.name}: {what} on the batch "
                     f"after key {lo}; rolled back, retry {attempt + 1}/{options.retries} in {delay:.1f}s")
            pause(delay, budget)
    raise AssertionError("unreachable")


def read_with_retries(engine: Engine, name: str, tables: tuple[str, ...], options: RunOptions,
                      work: Callable[[Connection], T], events: Events = LOGGED) -> T:
    """Run a long read (a fingerprint) in one REPEATABLE READ, READ ONLY transaction that
    waits for locks as briefly as a batch does and retries the same way."""
    for attempt in range(options.retries + 1):
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True,
                                          **{TIMEOUTS_OPTION: (options.lock_timeout_ms, None)})
            try:
                with conn.begin() as transaction:
                    result = work(conn)
                    transaction.rollback()
                return result
            except DBAPIError as exc:
                code = sqlstate(exc)
                if code not in TRANSIENT_STATES:
                    raise
                if attempt == options.retries:
                    raise _gave_up(conn, name, tables, code, attempt + 1, "nothing was written") from exc
                delay = options.backoff_s * 2 ** attempt
                events.warn(f"{name}: {TRANSIENT_STATES[code]}; retry {attempt + 1}/{options.retries} "
                         f"in {delay:.1f}s")
                time.sleep(delay)
    raise AssertionError("unreachable")


def _gave_up(conn: Connection, name: str, tables: tuple[str, ...], code: str | None,
             tries: int, undone: str) -> LockUnavailable:
    holders = table_lock_holders(conn, tables)
    conn.rollback()
    who = "; ".join(describe_holder(h) for h in holders[:3]) or "no lock holder is visible now"
    what = TRANSIENT_STATES.get(code or "", "a conflicting write")
    return LockUnavailable(
        f"{name}: {what} in {tries} tries; {undone}. Holding locks: {who}",
        "find out why that session holds its lock (or end it), then run the same command again "
        "to resume; --lock-timeout-ms raises the wait per try",
        details={"holders": holders},
    )


def _pause_between(seconds: float, budget: Budget) -> None:
    """``--pause-ms`` between batches: a wait during which `toolkit control` requests are
    still read (a long pause ends at once on an abort, or on a new pause-ms)."""
    control = budget.control
    if control is None:
        pause(seconds, budget)
        return
    began = time.monotonic()
    while not budget.stop_requested and control.aborted is None and control.paused is None:
        left = budget.options.pause_ms / 1000 - (time.monotonic() - began)
        if left <= 0:
            return
        pause(min(left, 0.5), budget)
        if control.due():
            control.poll()


def _maybe_inject_fault(done: int, variable: str = FAULT_KILL_AFTER_BATCHES_ENV) -> None:
    raw = os.environ.get(variable)
    if raw and done >= int(raw):
        os.kill(os.getpid(), signal.SIGKILL)


def after_action(actions_done: int) -> None:
    _maybe_inject_fault(actions_done, FAULT_KILL_AFTER_ACTIONS_ENV)

