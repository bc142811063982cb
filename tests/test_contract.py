"""The contract of every milestone (tests/contract.py), one test per property, each run for
milestones 1 to 4 (and realistic and adversarial data), so a failure names both.

"Equal" after a kill means: the fingerprint (every ML table and the MLflow view), the
toolkit's ledgers and archive row for row (leaving out only run ids and timestamps of its
own bookkeeping: a resumed milestone has two runs where the uninterrupted one has one),
the schema, and the tables a case names whole.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
from contract import CASES, MILESTONES, apply_result
from helpers import (
    TALLY,
    columns_as_sets,
    end_state,
    ledgers,
    rows_compared,
    schema_snapshot,
    snapshot,
    toolkit,
    toolkit_json,
    toolkit_process,
)

from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV
from toolkit.errors import ExitCode
from toolkit.sandbox.app_writer import AppWriter
from toolkit.schema.gitlab import ML_TABLE_NAMES

SEEDS = (3, 17)
EVERY = pytest.mark.parametrize("milestone", MILESTONES)
EVERY_ON_BOTH = pytest.mark.parametrize(("milestone", "profile"),
                                        [(m, p) for m in MILESTONES for p in CASES[m].profiles])


def _kept_ledgers(db) -> dict:
    return {table: rows for table, rows in ledgers(db).items() if rows}


def _state(db, milestone: str) -> str:
    """The milestone's state as ``toolkit status`` shows it."""
    _, doc = toolkit_json(db, "status")
    return next(m for m in doc["result"]["milestones"] if m["milestone"] == milestone)["state"]


def _apply_to_the_end(db, milestone: str) -> int:
    """``migrate`` (it verifies), then nothing is left to plan; the rows it changed."""
    code, doc = toolkit_json(db, "migrate", milestone, "--yes")
    assert code == 0, doc
    assert toolkit_json(db, "plan", milestone)[1]["result"]["milestones"][0]["rows"] == 0
    return doc["result"]["rows"]


def _present(db) -> tuple[str, ...]:
    """The ML tables the database has (milestone 4 drops two)."""
    return tuple(t for t in ML_TABLE_NAMES if db.scalar("SELECT to_regclass(:t) IS NOT NULL", t=t))


@EVERY_ON_BOTH
def test_apply_changes_what_the_dry_run_counted(milestone_states, make_database, milestone, profile):
    case = CASES[milestone]
    kept, applied = milestone_states.applied(profile, case.number)
    assert applied.code == 0, applied.doc
    assert applied.plan["rows"] == applied.doc["rows"] > 0
    assert applied.doc["complete"]
    case.after_apply(make_database(like=kept), applied)


@EVERY_ON_BOTH
def test_a_second_apply_changes_nothing(milestone_states, make_database, milestone, profile):
    kept, _ = milestone_states.applied(profile, CASES[milestone].number)
    assert _apply_to_the_end(make_database(like=kept), milestone) == 0


@EVERY_ON_BOTH
def test_every_milestone_so_far_verifies(milestone_states, milestone, profile):
    kept, _ = milestone_states.applied(profile, CASES[milestone].number)
    code, doc = toolkit_json(kept, "verify")  # read-only: the kept state itself
    assert code == 0, doc
    assert {m["milestone"]: m["ok"] for m in doc["result"]["milestones"]} == \
        {m: True if m in MILESTONES[:CASES[milestone].number] else None for m in MILESTONES}


@EVERY_ON_BOTH
def test_rollback_gives_back_the_schema_and_the_data(milestone_states, milestone, profile):
    case = CASES[milestone]
    before = milestone_states.before(profile, case.number)
    applied, seen = milestone_states.applied(profile, case.number)
    db, result = milestone_states.rolled_back(profile, case.number)  # read only, not copied
    assert result.exit_code == 0, result.output
    schema_before = schema_snapshot(before)
    # the round trip is not an empty one: the schema or the data changed on the way
    assert (schema_snapshot(applied), snapshot(applied, _present(applied))) != \
        (schema_before, snapshot(before, _present(applied)))
    same = columns_as_sets if case.rollback_moves_columns else dict
    assert same(schema_snapshot(db)) == same(schema_before)
    assert snapshot(db, ML_TABLE_NAMES) == snapshot(before, ML_TABLE_NAMES)
    assert _kept_ledgers(db) == _kept_ledgers(before)
    assert _state(db, milestone) == "rolled_back"
    case.after_rollback(db, seen.captured)


@EVERY_ON_BOTH
def test_it_applies_again_after_a_rollback(milestone_states, make_database, milestone, profile):
    kept, _ = milestone_states.rolled_back(profile, CASES[milestone].number)
    assert _apply_to_the_end(make_database(like=kept), milestone) > 0


@EVERY
def test_a_kill_at_a_random_batch_of_every_data_step_resumes_to_the_uninterrupted_end_state(
        milestone_states, make_database, milestone):
    """SIGKILL at a random batch of each data step (several seeds), run again, compare with
    the uninterrupted run (adversarial data, batches of the same size)."""
    case = CASES[milestone]
    before = milestone_states.before("adversarial", case.number)
    clean, applied = milestone_states.applied("adversarial", case.number)
    assert applied.code == 0, applied.doc
    expected = end_state(clean)
    expected_schema, expected_tables = schema_snapshot(clean), snapshot(clean, case.exact_tables)
    batch = str(case.batch_size("adversarial"))

    # batch numbers are counted across the run; each data step owns a range of them
    ranges, first = [], 1
    for step in applied.doc["passes"]:
        if step["batches"]:
            ranges.append((step["name"], first, first + step["batches"] - 1))
            first += step["batches"]
    assert ranges, "the milestone has data steps"
    kills = 0
    for name, lo, hi in ranges:
        for seed in SEEDS:
            kill_after = random.Random(f"{milestone}/{name}/{seed}").randint(lo, hi)
            killed = make_database(like=before)
            died = toolkit_process(killed, "migrate", milestone, "--yes", "--batch-size", batch,
                                   env={FAULT_KILL_AFTER_BATCHES_ENV: str(kill_after)})
            assert died.returncode == -signal.SIGKILL, (name, kill_after, died.stderr)
            left = killed.scalar("SELECT state FROM toolkit.milestones WHERE milestone = :m", m=milestone)
            assert left == "in_progress", (name, kill_after, left)
            resumed = toolkit_process(killed, "migrate", milestone, "--yes", "--batch-size", batch)
            assert resumed.returncode == 0, (name, kill_after, resumed.stdout, resumed.stderr)
            assert end_state(killed) == expected, (name, kill_after)
            assert schema_snapshot(killed) == expected_schema, (name, kill_after)
            assert snapshot(killed, case.exact_tables) == expected_tables, (name, kill_after)
            kills += 1
            TALLY["rows compared after a kill and a resume (kill matrix)"] += rows_compared(expected)
    assert kills == len(ranges) * len(SEEDS)


@EVERY
def test_what_the_application_writes_while_it_runs_ends_up_migrated(before_milestone, milestone):
    """GitLab as each milestone expects it deployed (toolkit/sandbox/app_writer.py) logs
    runs during the run and a little after; a re-run takes what came after the run's
    catch-up rounds, and every milestone so far verifies (its MLflow view check included)."""
    case = CASES[milestone]
    db = before_milestone(case.number, "realistic")
    writer = AppWriter.during(db.engine.url, milestone)
    writer.start()
    try:
        assert writer.writing.wait(30), writer.errors
        started = time.perf_counter()
        code, doc = toolkit_json(db, "migrate", milestone, "--yes", *case.writer_options)
        finished = time.perf_counter()
        time.sleep(0.3)  # and some more after it finished
    finally:
        writer.finish()
    assert code in ((0,) if case.writer_run_verifies else (0, ExitCode.VERIFY_FAILED)), doc
    assert apply_result(code, doc)["complete"]
    # the writer was inserting throughout the run, not only before or after it
    assert writer.written_between(started, finished) >= 5, (finished - started, writer.errors)
    assert len(writer.candidates) > 10, writer.errors
    # what milestone 4 drops can fail an insert at the instant it goes; nothing else may
    assert all("experiment_id" in e or "ml_experiments" in e for e in writer.errors), writer.errors
    assert len(writer.errors) <= 2, writer.errors
    if case.writer_max_latency_s is not None:
        slowest = max(took for _, took in writer.latencies)
        assert slowest < case.writer_max_latency_s, slowest
    case.after_writer_run(db, writer)
    rerun = toolkit(db, "migrate", milestone, "--yes")
    assert rerun.exit_code == 0, rerun.output
    for done in MILESTONES[:case.number]:
        verified = toolkit(db, "verify", done)
        assert verified.exit_code == 0, (done, verified.output)
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE id = ANY(:c)", c=writer.candidates) == \
        len(writer.candidates)
    case.after_writer(db, writer)
