"""``migrate milestone-4 --hold-before-drop`` archives and checks row for row, then waits
before its first drop holding nothing GitLab needs (the ML tables are there, no session
holds a lock on them), until ``toolkit control unpostpone`` from a second process, and ends
as a run without the hold; with ``--hold-flag-file`` it goes on once the file is gone; a
``control abort`` during the hold stops it resumable (exit 6) with nothing dropped, and a
rerun finishes; ``unpostpone`` with no run going is refused as the other requests are.

What happened is read from the run's --events file, never from the clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults import Running, end_left, start_toolkit
from helpers import differences, end_state, toolkit, toolkit_json

from toolkit.errors import ExitCode

ML_TABLES = ("ml_experiments", "ml_experiment_metadata", "ml_candidates")
LOCKS_ON_ML_TABLES = """
    SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
    WHERE c.relname IN ('ml_experiments', 'ml_experiment_metadata', 'ml_candidates')
      AND l.pid <> pg_backend_pid()"""
OPEN_TRANSACTIONS = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"""
_started: list[Running] = []


@pytest.fixture(autouse=True)
def _end_runs_left():
    """A failing test leaves no held run of its own going (it would never end)."""
    yield
    end_left(_started)


def lines_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(run: Running, found: Callable[[], object], timeout_s: float = 120) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := found():
            return value
        assert run.process.poll() is None, f"the run ended first: {run.stderr.read_text()}"
        time.sleep(0.1)
    raise AssertionError("the run never got there")


def held(path: Path) -> dict | None:
    return next((e for e in lines_of(path) if e["event"] == "held"), None)


def start_held(db, tmp_path: Path, tag: str, *hold: str) -> tuple[Running, Path]:
    events = tmp_path / f"{tag}.jsonl"
    run = start_toolkit(db, ("migrate", "milestone-4", "--yes", *hold, "--events", str(events)),
                        tmp_path, tag)
    _started.append(run)
    wait_until(run, lambda: held(events))
    return run, events


def assert_nothing_dropped_nor_locked(db) -> None:
    for table in ML_TABLES:
        assert db.scalar(f"SELECT to_regclass('{table}') IS NOT NULL"), table
    assert db.scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                     "'ml_candidates' AND column_name = 'experiment_id'") == 1
    assert db.scalar(LOCKS_ON_ML_TABLES) == 0
    assert db.scalar(OPEN_TRANSACTIONS) == 0


def test_held_before_drop_until_unpostpone_then_ends_as_a_run_without_the_hold(before_milestone,
                                                                               tmp_path):
    db, twin = before_milestone(4), before_milestone(4)
    assert toolkit(twin, "migrate", "milestone-4", "--yes").exit_code == 0
    run, events = start_held(db, tmp_path, "held", "--hold-before-drop")

    assert_nothing_dropped_nor_locked(db)
    assert db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments") == \
        db.scalar("SELECT count(*) FROM ml_experiments")
    shown = toolkit(db, "status")
    assert shown.exit_code == 0 and "held before drop since" in shown.output, shown.output
    run_id = held(events)["run_id"]
    assert f"(run {run_id})" in shown.output
    assert toolkit_json(db, "status")[1]["result"]["held"]["applied_by"] == run_id
    assert "held before drop" in run.stderr.read_text()

    asked = toolkit(db, "control", "unpostpone", "--reason", "backup checked")
    assert asked.exit_code == 0, asked.output
    code, _, err = run.wait()
    assert code == 0, err
    order = [e["event"] if e["event"] != "control" else e["action"] for e in lines_of(events)]
    assert order.index("held") < order.index("unpostpone")
    assert db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-4'") == "verified"
    assert differences(end_state(db), end_state(twin)) == []
    assert toolkit_json(db, "status")[1]["result"]["held"] is None


def test_the_flag_file_holds_until_it_is_removed(before_milestone, tmp_path):
    db = before_milestone(4)
    flag = tmp_path / "hold"
    flag.touch()
    run, _ = start_held(db, tmp_path, "flag", "--hold-flag-file", str(flag))
    assert_nothing_dropped_nor_locked(db)
    flag.unlink()
    code, _, err = run.wait()
    assert code == 0, err
    assert "removed" in err
    assert db.scalar("SELECT to_regclass('ml_experiments')") is None
    assert db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-4'") == "verified"


def test_abort_during_the_hold_exits_6_with_nothing_dropped_and_a_rerun_finishes(before_milestone,
                                                                                 tmp_path):
    db = before_milestone(4)
    run, _ = start_held(db, tmp_path, "aborted", "--hold-before-drop")
    assert toolkit(db, "control", "abort", "--reason", "window over").exit_code == 0
    code, _, err = run.wait()
    assert code == ExitCode.THROTTLED == 6, err
    assert_nothing_dropped_nor_locked(db)
    assert db.scalar("SELECT outcome FROM toolkit.runs ORDER BY id DESC LIMIT 1") == "aborted"
    again = toolkit(db, "migrate", "milestone-4", "--yes")
    assert again.exit_code == 0, again.output
    assert db.scalar("SELECT to_regclass('ml_experiments')") is None
    assert db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-4'") == "verified"


def test_unpostpone_with_no_run_going_is_refused_and_the_hold_is_for_milestone_4_only(realistic_db):
    refused = toolkit(realistic_db, "control", "unpostpone")
    assert refused.exit_code == ExitCode.REFUSED == 3, refused.output
    assert "no toolkit run is going" in refused.output
    kept = realistic_db.rows("SELECT action, applied_by, note FROM toolkit.run_controls")
    assert kept == [("unpostpone", None, "no run was going")]
    wrong = toolkit(realistic_db, "migrate", "milestone-1", "--hold-before-drop")
    assert wrong.exit_code == 2 and "milestone-4" in wrong.output, wrong.output
