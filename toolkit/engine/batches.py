"""Running a :class:`~toolkit.engine.step.KeysetPass`: short batches, resumable, interruptible.

Each batch is one transaction that (1) sets ``lock_timeout`` and ``statement_timeout``
for itself only (the engine's ``begin`` hook, from the connection's options), (2) finds
the batch's upper key, (3) runs the change, and (4) writes the checkpoint (and the run's
row count). So a crash at any instant leaves either the whole batch and its checkpoint
or neither, and the next run resumes exactly after the last committed batch. Its commit
is fenced by the run's lease (``lease.py``): a run that lost its hold commits nothing.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.db import TIMEOUTS_OPTION
from toolkit.engine import state
from toolkit.engine.budget import Budget
from toolkit.engine.events import LOGGED, Events, emit
from toolkit.engine.locks import (
    TRANSIENT_STATES,
    UNIQUE_VIOLATION,
    describe_holder,
    table_lock_holders,
)
from toolkit.engine.results import PassResult
from toolkit.engine.settings import RunOptions
from toolkit.engine.sizing import BatchSizer
from toolkit.errors import LockUnavailable

if TYPE_CHECKING:
    from toolkit.engine.step import KeysetPass

MAX_CATCH_UP_ROUNDS = 5
T = TypeVar("T")

# Read by the engine only, for tests: SIGKILL this process right after the Nth batch commits,
# or right after the Nth action (a DDL change or a whole pass) of a run completes.
FAULT_KILL_AFTER_BATCHES_ENV = "TOOLKIT_FAULT_KILL_AFTER_BATCHES"
FAULT_KILL_AFTER_ACTIONS_ENV = "TOOLKIT_FAULT_KILL_AFTER_ACTIONS"


def sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def run_pass(engine: Engine, milestone: str, kpass: KeysetPass, run_id: int, options: RunOptions,
             budget: Budget) -> PassResult:
    result = PassResult(kpass.name)
    with engine.connect() as conn:
        conn = conn.execution_options(**{TIMEOUTS_OPTION: (options.lock_timeout_ms,
                                                           options.statement_timeout_ms)})
        if kpass.skip_if_sql and conn.execute(sa.text(kpass.skip_if_sql)).scalar():
            conn.rollback()
            result.complete = True
            return result
        lo, upper = _key_range(conn, milestone, kpass, run_id)
        total = conn.execute(sa.text(kpass.remaining_sql()), {"lo": lo, "upper": upper}).scalar_one()
        conn.commit()
        emit(budget.events, "pass_start", milestone=milestone, pass_name=kpass.name, run_id=run_id,
             key_from=lo, key_upper=upper, keys=total)
        catch_ups = 0
        sizer = BatchSizer(options.batch_size, options.target_batch_ms, options.min_batch_size,
                           options.max_batch_size)
        with budget.events.progress(total, kpass.name) as bar:
            while True:
                if reason := _before_batch(kpass, budget):
                    result.stopped = reason
                    return result
                if budget.control is not None and budget.control.resized:
                    budget.control.resized = False
                    sizer = BatchSizer(options.batch_size, options.target_batch_ms,
                                       options.min_batch_size, options.max_batch_size)
                began = time.perf_counter()
                budget.retries = 0
                key_from = lo
                hi, changed, scanned, wal = _one_batch(conn, milestone, kpass, lo, upper, run_id,
                                                       options, budget, sizer.size)
                if hi is None:
                    new_upper = conn.execute(sa.text(kpass.upper_key_sql())).scalar_one()
                    if kpass.catch_up and new_upper > upper and catch_ups < MAX_CATCH_UP_ROUNDS:
                        catch_ups += 1
                        lo, upper = upper, new_upper
                        state.extend_checkpoint(conn, milestone, kpass.name, lo, upper)
                        conn.commit()
                        continue
                    state.complete_checkpoint(conn, milestone, kpass.name, run_id)
                    conn.commit()
                    result.complete = True
                    return result
                took = time.perf_counter() - began
                result.batch_seconds.append(took)
                result.batch_sizes.append(scanned)
                sizer.record(took, scanned)
                if budget.on_commit is not None:
                    budget.on_commit(milestone, kpass.name, hi)
                lo = hi
                _counted(result, budget, changed, wal)
                bar.update(scanned, changed)
                emit(budget.events, "batch", milestone=milestone, pass_name=kpass.name, run_id=run_id,
                     key_from=key_from, key_to=hi, keys=scanned, rows=changed,
                     ms=round(took * 1000, 3), retries=budget.retries,
                     wal_bytes=wal)
                _maybe_inject_fault(budget.batches)
                if options.pause_ms:
                    _pause_between(options.pause_ms / 1000, budget)


def _key_range(conn: Connection, milestone: str, kpass: KeysetPass, run_id: int) -> tuple[int, int]:
    """Where the pass takes up: after its checkpoint's last key, up to the upper key it
    fixed; from the start (a new upper key, the checkpoint restarted) when it has none."""
    checkpoint = state.read_checkpoint(conn, milestone, kpass.name)
    if checkpoint is None or checkpoint.completed_at is not None or checkpoint.upper_key is None:
        upper = conn.execute(sa.text(kpass.upper_key_sql())).scalar_one()
        state.restart_checkpoint(conn, milestone, kpass.name, run_id, upper)
        return 0, upper
    return checkpoint.last_key or 0, checkpoint.upper_key


def _before_batch(kpass: KeysetPass, budget: Budget) -> str | None:
    """At a batch boundary: `toolkit control` requests taken (a pause waits here), then the
    health throttle's wait. Why the pass stops here, if it does."""
    budget.steer()
    if reason := budget.exhausted_reason():
        return reason
    if budget.throttle is not None:
        budget.throttle.wait(kpass.tables, kpass.name)
        if budget.control is not None and budget.control.paused is not None:
            budget.steer()  # paused during the wait: no batch before the resume
        return budget.exhausted_reason()
    return None


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
            with conn.begin():
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


def pause(seconds: float, budget: Budget) -> None:
    """Sleep in small steps so Ctrl-C during a pause stops promptly."""
    deadline = time.monotonic() + seconds
    while not budget.stop_requested and time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


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


_sleep = pause  # the name health.py imports
