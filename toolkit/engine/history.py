"""A run's own history row: opened when the run holds the lease, closed with how it really
ended, whatever ended it (a batch boundary, Ctrl-C, a lost session, a failure)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from toolkit.cancel import StatementCancelled, stop_in_chain
from toolkit.conninfo import render as render_url
from toolkit.db_errors import cannot_connect, first_line, lost_session_error, resource_exhausted, session_lost
from toolkit.engine import fenced, state, unrecorded, writer
from toolkit.engine.events import Events, emit
from toolkit.engine.fenced import UNFENCED
from toolkit.engine.lease import Hold
from toolkit.engine.plan import Milestone
from toolkit.engine.results import ApplyResult, MilestoneState, Outcome
from toolkit.engine.settings import RunOptions
from toolkit.errors import (
    Aborted,
    HookVetoed,
    Interrupted,
    SessionLost,
    Throttled,
    ToolkitError,
    redact,
    without_database_urls,
    without_driver_internals,
)
from toolkit.schema.migrations import ensure_own_tables
from toolkit.words import counted


def error_text(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """What history keeps of an unexpected failure: its kind and first line, redacted. Of a
    driver error, the SQLSTATE and the server's first line: never SQLAlchemy's statement
    dump, parameters or link, which the column would otherwise keep."""
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        kind = type(exc.orig).__name__ + (f" ({sqlstate})" if sqlstate else "")
        return f"{kind}: {first_line(exc, secrets)}"
    return redact(f"{type(exc).__name__}: {without_driver_internals(str(exc))}", secrets)


class RunHistory:
    """``toolkit.runs`` as one run writes it."""

    def __init__(self, engine: Engine, options: RunOptions, events: Events, command: str = ""):
        self.engine = engine
        self.options = options
        self.events = events
        self.command = command
        # Ends an earlier attempt could not write (the server was gone): the next attempt
        # that holds the lease writes them.
        self._unrecorded: list[tuple[int, Outcome, dict[str, int], str | None, dict[str, Any] | None]] = []

    def recorded_command(self, verb: str, milestone: Milestone) -> str:
        """The command for history. One that runs several milestones (``toolkit demo``) gets
        the part this run was, so history still says what each of its runs did."""
        if not self.command:
            return f"toolkit {verb} {milestone.name}"
        if milestone.name in self.command:
            return self.command
        return f"{self.command} ({verb} {milestone.name})"

    @contextmanager
    def recorded(self, hold: Hold, milestone: Milestone, verb: str,
                 state_during: MilestoneState) -> Iterator[ApplyResult]:
        """Claim the lease, open the history row and set the milestone's state; on the way
        out record how the run really ended, whatever ended it."""
        run_id = self._open(hold, milestone, verb, state_during)
        result = ApplyResult(milestone, run_id, [])
        emit(self.events, "run_start", run_id=run_id, milestone=milestone.name, verb=verb,
             command=self.recorded_command(verb, milestone))
        try:
            yield result
        except (KeyboardInterrupt, Exception) as exc:
            self._failed(result, exc)
            raise
        self._ended(result)

    def _open(self, hold: Hold, milestone: Milestone, verb: str, state_during: MilestoneState) -> int:
        """The run's history row, opened once it holds the lease, with the milestone's state;
        and the ends earlier runs could not write, written now that the database answers."""
        with self.engine.connect() as conn:
            ensure_own_tables(conn)
            hold.claim(conn)
            options = self.options.as_dict()
            run_id = state.start_run(conn, self.recorded_command(verb, milestone), milestone.name,
                                     {**options, **writer.stamp(options)})
            hold.record_run(conn, run_id)
            state.set_milestone_state(conn, milestone.name, state_during, run_id)
            while self._unrecorded:  # an earlier attempt's end, now that the database answers
                state.finish_run(conn, *self._unrecorded.pop())
            # an earlier process's end, kept on this machine when the database could not take it
            kept = unrecorded.take(self.engine.url)
            try:
                state.close_abandoned_runs(conn, run_id, kept)
                fenced.commit(conn)
            except BaseException:
                for end in kept:
                    unrecorded.keep(self.engine.url, end["run_id"], end["outcome"], end["rows"], end["error"])
                raise
        return run_id

    def _failed(self, result: ApplyResult, exc: BaseException) -> None:
        """A run an exception ended: recorded as it really ended. Raises what the operator is
        to see instead of ``exc`` (a stop, a resource run out, a lost session), if anything."""
        name = result.milestone.name
        if isinstance(exc, HookVetoed):  # at a pass boundary: nothing half-done, resumable
            self.finish(result, Outcome.VETOED, exc.one_line())
            return
        if isinstance(exc, KeyboardInterrupt):
            self._stopped(result, "aborted during a batch; that batch was rolled back",
                          f"Aborted: {name} stopped during a batch, which was rolled back")
        if isinstance(exc, StatementCancelled):
            said = f"stopped by a signal: the statement under way was {exc}, and rolled back"
            self._stopped(result, said, f"Stopped: {name} {said}", cause=exc)
        if isinstance(exc, SessionLost):
            self.finish(result, Outcome.INTERRUPTED, exc.one_line())
            return
        self._masked_stop(result, exc)
        if isinstance(exc, ToolkitError):
            self.finish(result, Outcome.FAILED, exc.one_line())
        elif isinstance(exc, DBAPIError):
            self._database_failed(result, exc)
        else:
            self.finish(result, Outcome.FAILED, error_text(exc, self.events.secrets))

    def _database_failed(self, result: ApplyResult, exc: DBAPIError) -> None:
        """A driver error: a resource run out and a lost session are raised as what they are
        (their cause in the line the operator saw, written from a connection of its own: the
        pool's pre-ping replaces the run's if the server dropped it); anything else failed."""
        url = render_url(self.engine.url)
        exhausted = resource_exhausted(exc, url, self.events.secrets)
        if exhausted is not None:
            self.finish(result, Outcome.INTERRUPTED, exhausted.one_line())
            raise exhausted from exc
        why = session_lost(exc, during_run=True) or (
            "the database cannot be reached" if cannot_connect(exc) else None)
        if why:
            lost = lost_session_error(exc, why, url, self.events.secrets)
            self.finish(result, Outcome.INTERRUPTED, lost.one_line())
            raise lost from exc
        self.finish(result, Outcome.FAILED, error_text(exc, self.events.secrets))

    def _ended(self, result: ApplyResult) -> None:
        """The run's body returned: recorded with its outcome. One stopped at a batch boundary
        (Ctrl-C, `toolkit control abort`, the health throttle) is raised as what stopped it."""
        stops: dict[str, Callable[[ApplyResult], ToolkitError]] = {
            Outcome.INTERRUPTED: self._interrupted, Outcome.ABORTED: self._aborted,
            Outcome.THROTTLED: self._throttled}
        stopped = result.stopped  # None: whole; max-batches, max-runtime: partial
        stop = stops.get(stopped) if stopped is not None else None
        if stopped is None or stop is None:
            self.finish(result, result.outcome)
            return
        self.finish(result, Outcome(stopped))
        raise stop(result)

    def _interrupted(self, result: ApplyResult) -> ToolkitError:
        return Interrupted(
            f"Stopped {result.milestone.name} at a batch boundary after {counted(result.rows, 'row')}",
            "run the same command again to resume from where it stopped",
            details={"passes": [p.__dict__ for p in result.passes]},
        )

    def _aborted(self, result: ApplyResult) -> ToolkitError:
        asked = result.controls[-1] if result.controls else {}
        by = f"{asked.get('db_user')} ({asked.get('os_user')}@{asked.get('host')})"
        why = f": {asked['reason']}" if asked.get("reason") else ""
        # aborted during the closing verify (runner._steered_verify): every pass is done
        verifying = "verify" in result.timings and result.verify is None
        where = ("during its closing verify: it is applied, not verified" if verifying
                 else f"at a batch boundary after {counted(result.rows, 'row')}")
        return Aborted(
            f"Stopped {result.milestone.name} {where}: "
            f"`toolkit control abort` by {by}{why}; nothing is half-done",
            "run the same command again to " + ("verify it (nothing is applied again)" if verifying
                                                else "resume from where it stopped"),
            details={"passes": [p.__dict__ for p in result.passes], "controls": result.controls},
        )

    def _throttled(self, result: ApplyResult) -> ToolkitError:
        waited = ", ".join(f"{signal.replace('_', ' ')} {seconds:.1f} s"
                           for signal, seconds in result.throttled_seconds.items())
        return Throttled(
            f"Stopped {result.milestone.name} at a batch boundary after {counted(result.rows, 'row')}: the "
            "database "
            f"stayed unhealthy for --max-throttle-s {self.options.max_throttle_s:g} s of waiting "
            f"({waited}); nothing is half-done",
            "run the same command again to resume once the database is healthy (see the health "
            "readings in `toolkit plan`); a larger --max-throttle-s waits longer",
            details={"passes": [p.__dict__ for p in result.passes],
                     "throttled_seconds": result.throttled_seconds},
        )

    def _stopped(self, result: ApplyResult, recorded: str, problem: str,
                 cause: BaseException | None = None) -> NoReturn:
        """A run a signal stopped mid-statement: history says ``interrupted``, exit 130."""
        self.finish(result, Outcome.INTERRUPTED, recorded)
        raise Interrupted(problem, "run the same command again to resume from the last completed batch"
                          ) from cause

    def _masked_stop(self, result: ApplyResult, exc: BaseException) -> None:
        """A stop that a later error masked (a commit on the connection the stop invalidated)
        is still a stop, not a failure."""
        if (stop := stop_in_chain(exc)) is not None:
            said = "aborted by a signal; the statement under way was rolled back"
            self._stopped(result, said, f"Aborted: {result.milestone.name} {said}", cause=stop)

    def finish(self, result: ApplyResult, outcome: Outcome, error: str | None = None) -> None:
        extra: dict[str, Any] = {"throttled_seconds": result.throttled_seconds}
        if result.controls:  # each `toolkit control` request the run took, in its history row
            extra["controls"] = result.controls
        wal = {p.name: p.wal_bytes for p in result.passes if p.wal_bytes}
        self.record_end(result.run_id, outcome, {p.name: p.rows for p in result.passes}, error, extra,
                        wal=wal)

    def record_end(self, run_id: int, outcome: Outcome, rows: dict[str, int], error: str | None,
                    extra: dict[str, Any] | None = None, *, wal: dict[str, int] | None = None) -> None:
        """The run's own history row, written even after the hold is lost (it says so) and
        given up on, with a warning, when the server cannot be reached to write it."""
        if error is not None:
            error = without_database_urls(redact(without_driver_internals(error), self.events.secrets))
        # WAL: in the event only; history's runs.wal_bytes_by_step is kept by the batches
        emit(self.events, "run_end", run_id=run_id, outcome=outcome, rows=sum(rows.values()),
             rows_by_step=rows, error=error, wal_bytes=sum((wal or {}).values()),
             wal_bytes_by_step=wal or {}, **(extra or {}))
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(**{UNFENCED: True})
                state.finish_run(conn, run_id, outcome, rows, error, extra)
        except DBAPIError as exc:
            # After a failover the old primary is gone and the new one may still be read-only;
            # a crashed server, or one whose disk is full, takes nothing: the next attempt
            # (--reconnect) records it once it holds the lease, and so does the next run from
            # this machine, which finds it kept here.
            self._unrecorded.append((run_id, outcome, rows, error, extra))
            kept = unrecorded.keep(self.engine.url, run_id, outcome, rows, error)
            self.events.warn(
                f"could not record how run {run_id} ended ({first_line(exc, self.events.secrets)}); "
                + ("the next run on this database from this machine records it"
                   if kept else "`toolkit history` shows it as stopped unrecorded unless --reconnect "
                                "records it")
            )
