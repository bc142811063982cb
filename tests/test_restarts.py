"""A transient fault in the middle of a run: the server restarts (fast or immediate
shutdown) or the toolkit's batch session is terminated (pg_terminate_backend).

The run is a real process with small batches and a pause between them; the test polls
the batches it has committed and injects the fault at a random one (seeded). Then:

- without ``--reconnect``: the run exits 75 with one line (what happened, everything
  committed is kept, run the same command again), no traceback; ``toolkit history``
  records it as ``interrupted`` (``stopped unrecorded`` when the server was down when it
  tried to record that) with the rows its committed batches changed; the same command
  run again exits 0;
- with ``--reconnect 10``: the one run resumes by itself and exits 0;

and either way the end state equals an uninterrupted twin's: every ML table and the
MLflow view (fingerprint) and the toolkit's ledgers, row for row.

The faults need a server of this module's own (the session's shared one must never be
restarted), started once; each case copies a template database on it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults import (
    SEQUENCE_ID_PARTS,
    FaultServer,
    ServerDb,
    checkpoint_rows,
    id_free,
    newest_run_id,
    start_toolkit,
    wait_for_batches,
)
from helpers import TALLY, differences, end_state, resolve_m1_anomalies, rows_compared, toolkit

from toolkit.errors import ExitCode, without_database_urls
from toolkit.sandbox.generator import seed_database
from toolkit.sandbox.scales import SCALES

SEED = 75
MILESTONES = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")
FAST, IMMEDIATE, TERMINATE = "fast restart", "immediate restart", "terminated batch session"
FAULTS = (FAST, IMMEDIATE, TERMINATE)
BATCH = ("--batch-size", "4")
PACE = ("--pause-ms", "30")


@dataclass(frozen=True)
class Case:
    verb: str  # migrate or rollback
    milestone: str
    fault: str
    reconnect: bool

    @property
    def command(self) -> tuple[str, ...]:
        return (self.verb, self.milestone, "--yes") if self.verb == "migrate" else (self.verb, self.milestone)

    @property
    def id(self) -> str:
        return f"{self.verb}-{self.milestone}-{self.fault.replace(' ', '-')}" + (
            "-reconnect" if self.reconnect else "")


# Every milestone's migrate and two rollbacks, each with a fault; each kind of fault twice.
# Then one run per kind of fault with --reconnect, on a command drawn at random, and a few
# more combinations drawn at random (all 36 would take about three minutes).
COMMANDS = [("migrate", m) for m in MILESTONES] + [("rollback", "milestone-4"), ("rollback", "milestone-3")]
EXTRA = 5
_draw = random.Random(SEED)
_kinds = list(FAULTS) * 2
_draw.shuffle(_kinds)
CASES = [Case(verb, m, fault, False) for (verb, m), fault in zip(COMMANDS, _kinds, strict=True)]
CASES += [Case(*_draw.choice(COMMANDS), fault, True) for fault in FAULTS]
_rest = [Case(verb, m, fault, reconnect) for verb, m in COMMANDS for fault in FAULTS
         for reconnect in (False, True)]
CASES += _draw.sample([c for c in _rest if c not in CASES], EXTRA)


@dataclass
class Twin:
    """What the uninterrupted run did: its batches, rows, and the end state."""

    batches: int
    rows: int
    state: tuple
    id_free: dict


class Lab:
    """The module's server, with one template per starting point and one twin per command."""

    def __init__(self, server: FaultServer):
        self.server = server
        self.templates: dict[str, str] = {}
        self.twins: dict[tuple[str, str], Twin] = {}
        self.copies = 0

    def template(self, point: str) -> str:
        """``before-milestone-N`` (milestones 1..N-1 applied) or ``after-milestone-4``."""
        if point in self.templates:
            return self.templates[point]
        name = "tpl_" + point.replace("-", "_")
        if point == "before-milestone-1":
            db = self.server.database(name)
            with db.engine.connect() as conn:
                seed_database(conn, SCALES["small"], "adversarial", seed=1)
            resolve_m1_anomalies(db)
        else:
            when, milestone = point.split("-", 1)
            previous = milestone if when == "after" else MILESTONES[MILESTONES.index(milestone) - 1]
            db = self.server.database(name, template=self.template(f"before-{previous}"))
            done = toolkit(db, "migrate", previous, "--yes")
            assert done.exit_code == 0, done.output
        db.dispose()
        self.templates[point] = name
        return name

    def copy(self, case: Case) -> ServerDb:
        start = (f"before-{case.milestone}" if case.verb == "migrate" else
                 "after-milestone-4" if case.milestone == "milestone-4" else "before-milestone-4")
        self.copies += 1
        return self.server.database(f"case_{self.copies}", template=self.template(start))

    def twin(self, case: Case) -> Twin:
        key = (case.verb, case.milestone)
        if key not in self.twins:
            db = self.copy(case)
            done = toolkit(db, "--json", *case.command, *BATCH)
            assert done.exit_code == 0, done.output
            doc = json.loads(done.stdout)["result"]
            self.twins[key] = Twin(sum(p["batches"] for p in doc["passes"]), doc["rows"], end_state(db),
                                   id_free(db))
            self.server.drop(db.name)
        return self.twins[key]


@pytest.fixture(scope="module")
def lab():
    with FaultServer.started() as server:
        yield Lab(server)


def _inject(lab: Lab, db: ServerDb, fault: str) -> None:
    if fault == TERMINATE:
        _, caught_in = lab.server.terminate_batch_session(db.name)
        TALLY["batch sessions terminated mid-run (pg_terminate_backend)"] += 1
        TALLY[f"batch sessions terminated mid-run, caught {caught_in}"] += 1
    else:
        mode = "fast" if fault == FAST else "immediate"
        lab.server.restart(mode)
        TALLY[f"server restarts injected mid-run (pg_ctl restart -m {mode})"] += 1


def _history(db: ServerDb, after_run: int) -> list[dict]:
    done = toolkit(db, "--json", "history", "--limit", "50")
    assert done.exit_code == 0, done.output
    runs = json.loads(done.stdout)["result"]["runs"]
    return sorted((r for r in runs if r["id"] > after_run), key=lambda r: r["id"])


def _rows(run: dict) -> dict[str, int]:
    return {step: rows for step, rows in (run["rows_by_step"] or {}).items() if rows}


def _one_line_session_lost(code: int, stdout: str, stderr: str) -> str:
    """The interrupted run's ending: exit 75, one error line, no traceback. Returns the line."""
    assert code == ExitCode.SESSION_LOST, f"exit {code}\n{stdout}\n{stderr}"
    assert "Traceback" not in stdout + stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    line = errors[0]
    assert line.startswith("error: Interrupted: "), line
    assert "everything committed before it is kept" in line and "run the same command again" in line, line
    # Besides that line, only the warning that the run's end could not be recorded (the
    # server was down at that moment), which says how history will show it.
    others = [line for line in stderr.splitlines()
              if line.strip() and not line.startswith(("error:", "progress: ", "Using the database"))]
    assert len(others) <= 1 and all(o.startswith("warning: could not record how run") for o in others), stderr
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_fault_at_a_random_batch_resumes_to_the_uninterrupted_end_state(case: Case, lab: Lab,
                                                                           tmp_path: Path):
    twin = lab.twin(case)
    assert twin.batches >= 3, f"{case.id}: too few batches ({twin.batches}) to fault in the middle"
    # the fault comes once this many batches have committed; the test polls every 5 ms and
    # the run pauses 30 ms between batches, so it lands before the last one
    at = random.Random(f"{SEED}/{case.id}").randint(1, max(1, twin.batches - 3))
    db = lab.copy(case)
    prior = newest_run_id(db)
    args = (*case.command, *BATCH, *PACE) + (("--reconnect", "10") if case.reconnect else ())
    running = start_toolkit(db, args, tmp_path, "faulted")
    run_id = wait_for_batches(db, running, prior, at)
    _inject(lab, db, case.fault)
    code, stdout, stderr = running.wait()
    where = f"{case.id}: fault after batch {at} of {twin.batches} (run {run_id})"

    if case.reconnect:
        assert code == 0, f"{where}\n{stdout}\n{stderr}"
        assert "reconnecting in" in stderr and "to resume (attempt 1 of 10)" in stderr, (where, stderr)
        assert "Traceback" not in stdout + stderr, stderr
        runs = _history(db, prior)
        assert len(runs) >= 2, (where, runs)
        assert runs[-1]["outcome"] == "succeeded", (where, runs[-1])
        for run in runs[:-1]:  # an attempt that could not record its end has the next one do it
            assert run["outcome"] == "interrupted", (where, run)
            assert run["error"].startswith("Interrupted: "), (where, run)
        TALLY["runs resumed by themselves with --reconnect after a fault"] += 1
    else:
        line = _one_line_session_lost(code, stdout, stderr)
        # what the checkpoints say the run committed, read before a resumed run moves them on
        committed, batches = checkpoint_rows(db, run_id)
        assert batches >= at, (where, f"the run's checkpoints count {batches} batches")
        (interrupted,) = _history(db, prior)
        assert interrupted["id"] == run_id
        if "warning: could not record how run" in stderr:
            assert interrupted["outcome"] == "stopped unrecorded", (
                where, "the server was down when the run tried to record its end", interrupted)
        else:
            assert interrupted["outcome"] == "interrupted", (
                where, "the server was up to record the run's end", interrupted)
            # the message the operator saw, the database's URL in it said as "the database"
            assert interrupted["error"] == without_database_urls(line.removeprefix("error: ")), (
                where, interrupted)
            assert "postgresql://" not in interrupted["error"]
        TALLY[f"interrupted runs shown as {interrupted['outcome']} in history"] += 1
        assert _rows(interrupted) == committed, (where, "history's rows are the committed batches'")

        again = start_toolkit(db, args, tmp_path, "resumed")
        code, stdout, stderr = again.wait()
        assert code == 0, (where, stdout, stderr)
        runs = _history(db, prior)
        assert [r["outcome"] for r in runs][1:] == ["succeeded"], (where, runs)

    # no batch was lost or counted twice: the runs' rows add up to the uninterrupted run's
    assert sum(sum(_rows(r).values()) for r in runs) == twin.rows, (where, runs)
    state = end_state(db)
    if state != twin.state and case.fault == IMMEDIATE:
        # after crash recovery PostgreSQL's sequences skip the values they had logged ahead:
        # rows created after the restart have other ids than the twin's, and nothing else
        differ = differences(state, twin.state)
        assert set(differ) <= SEQUENCE_ID_PARTS, (where, differ)
        assert id_free(db) == twin.id_free, (where, "equal but for sequence-made ids", differ)
        TALLY["end states equal but for the ids sequences skipped after a crash"] += 1
    else:
        assert state == twin.state, (where, differences(state, twin.state))
    TALLY["rows compared after a fault and a resume (restarts)"] += rows_compared(state)
    lab.server.drop(db.name)


def test_with_reconnect_a_restart_longer_than_the_first_backoff_is_waited_out(lab: Lab, tmp_path: Path):
    """The server is down for 3 s (a production restart takes that and more): attempts at
    1 s and 3 s find it down and back off again; one after that resumes and ends equal."""
    case = Case("migrate", "milestone-4", "slow restart", True)
    twin = lab.twin(case)
    at = random.Random(f"{SEED}/{case.id}").randint(1, twin.batches - 3)
    db = lab.copy(case)
    prior = newest_run_id(db)
    running = start_toolkit(db, (*case.command, *BATCH, *PACE, "--reconnect", "10"), tmp_path, "faulted")
    wait_for_batches(db, running, prior, at)
    lab.server.stop_for(3.0)
    TALLY["server restarts injected mid-run (stopped for 3 s)"] += 1
    code, stdout, stderr = running.wait()
    assert code == 0, f"fault after batch {at}: exit {code}\n{stdout}\n{stderr}"
    assert "Traceback" not in stdout + stderr
    assert end_state(db) == twin.state
    TALLY["runs resumed by themselves with --reconnect after a fault"] += 1
    lab.server.drop(db.name)
