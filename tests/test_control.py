"""``toolkit control`` from a second process steers a run that goes on in its own process:
pause stops its batches within one batch and resume continues to the same end state as an
uninterrupted twin; set changes the size of the batches that follow; abort stops it with
the resumable exit code and a rerun finishes; a bad set is refused (exit 2, nothing
stored); with no run going the request is kept as refused and the command exits 3.

Each run is milestone 1 on the small realistic data set in batches of 5 keys with a
--pause-ms between them, so it lasts long enough to be steered; what happened is read from
its --events file (the order of its lines), never from the clock.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults import Running, end_left
from faults import start_toolkit as _start_toolkit
from helpers import differences, end_state, toolkit, toolkit_json

from toolkit.errors import ExitCode

SLOW = ("--batch-size", "5", "--pause-ms", "200")
_started: list[Running] = []


def start_toolkit(*args, **kwargs) -> Running:
    run = _start_toolkit(*args, **kwargs)
    _started.append(run)
    return run


@pytest.fixture(autouse=True)
def _end_runs_left():
    """A failing test leaves no run of its own going (a paused or waiting one would not end)."""
    yield
    end_left(_started)


def lines_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(run: Running, found: Callable[[], object], timeout_s: float = 90) -> object:
    """Poll until ``found()`` is truthy; fails if the run ends first (or never gets there)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := found():
            return value
        assert run.process.poll() is None, f"the run ended first: {run.stderr.read_text()}"
        time.sleep(0.1)
    raise AssertionError("the run never got there")


def batches(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "batch"]


def control_event(path: Path, action: str) -> dict | None:
    return next((e for e in lines_of(path) if e["event"] == "control" and e["action"] == action), None)


def start(db, tmp_path: Path, tag: str) -> tuple[Running, Path]:
    events = tmp_path / f"{tag}.jsonl"
    run = start_toolkit(db, ("migrate", "milestone-1", *SLOW, "--events", str(events)), tmp_path, tag)
    wait_until(run, lambda: batches(lines_of(events)))
    return run, events


def test_pause_stops_batches_and_resume_ends_as_an_uninterrupted_twin(realistic_db, make_database,
                                                                       tmp_path):
    twin = make_database("realistic:small")
    assert toolkit(twin, "migrate", "milestone-1", "--batch-size", "5").exit_code == 0
    run, events = start(realistic_db, tmp_path, "paused")

    before = len(batches(lines_of(events)))
    asked = toolkit(realistic_db, "control", "pause", "--reason", "vacuum first")
    assert asked.exit_code == 0, asked.output
    took = wait_until(run, lambda: control_event(events, "pause"))
    assert took["reason"] == "vacuum first" and took["db_user"] and took["host"]
    shown = toolkit(realistic_db, "status")
    assert shown.exit_code == 0 and "paused by" in shown.output and "vacuum first" in shown.output
    code, doc = toolkit_json(realistic_db, "status")
    assert code == 0 and doc["result"]["paused"]["reason"] == "vacuum first"
    assert doc["result"]["paused"]["applied_by"] == took["run_id"]

    assert toolkit(realistic_db, "control", "resume").exit_code == 0
    code, _, err = run.wait()
    assert code == 0, err
    lines = lines_of(events)
    order = [e["event"] if e["event"] != "control" else e["action"] for e in lines]
    paused_at, resumed_at = order.index("pause"), order.index("resume")
    # within one batch of the request, and none at all while paused
    assert order[:paused_at].count("batch") <= before + 1
    assert "batch" not in order[paused_at:resumed_at]
    assert "batch" in order[resumed_at:]
    assert differences(end_state(realistic_db), end_state(twin)) == []
    taken = realistic_db.rows("SELECT action, applied_by FROM toolkit.run_controls ORDER BY id")
    assert [t[0] for t in taken] == ["pause", "resume"] and all(t[1] for t in taken)
    recorded = realistic_db.scalar("SELECT options->'controls' FROM toolkit.runs WHERE id = :id",
                                   id=taken[0][1])
    assert [c["action"] for c in recorded] == ["pause", "resume"]
    assert toolkit_json(realistic_db, "status")[1]["result"]["paused"] is None


def test_set_batch_size_changes_the_batches_that_follow(realistic_db, tmp_path):
    run, events = start(realistic_db, tmp_path, "resized")
    asked = toolkit(realistic_db, "control", "set", "batch-size=8", "--reason", "faster")
    assert asked.exit_code == 0, asked.output
    code, _, err = run.wait()
    assert code == 0, err
    lines = lines_of(events)
    at = next(i for i, e in enumerate(lines) if e["event"] == "control")
    assert lines[at]["key"] == "batch-size" and lines[at]["value"] == "8" and lines[at]["before"] == 5
    before, after = batches(lines[:at]), batches(lines[at:])
    assert {b["keys"] for b in before} == {5}
    # every batch that follows takes 8 keys, but a pass's last, which takes what is left
    by_pass: dict[str, list[int]] = {}
    for b in after:
        by_pass.setdefault(b["pass_name"], []).append(b["keys"])
    assert any(len(sizes) > 1 for sizes in by_pass.values())
    assert all(set(sizes[:-1]) <= {8} and sizes[-1] <= 8 for sizes in by_pass.values())


def test_set_target_batch_ms_resizes_the_batches_that_follow(realistic_db, tmp_path):
    """A run started with a fixed size (5 keys, no target) is given a time budget: the batches
    that follow are sized toward it, growing at most twice per batch (engine/sizing.py)."""
    run, events = start(realistic_db, tmp_path, "budgeted")
    asked = toolkit(realistic_db, "control", "set", "target-batch-ms=1000", "--reason", "adapt")
    assert asked.exit_code == 0, asked.output
    code, _, err = run.wait()
    assert code == 0, err
    lines = lines_of(events)
    at = next(i for i, e in enumerate(lines) if e["event"] == "control")
    assert lines[at]["key"] == "target-batch-ms" and lines[at]["value"] == "1000"
    before, after = batches(lines[:at]), batches(lines[at:])
    assert {b["keys"] for b in before} == {5}
    by_pass: dict[str, list[int]] = {}
    for b in after:
        by_pass.setdefault(b["pass_name"], []).append(b["keys"])
    # a batch of 5 keys takes milliseconds: each next one doubles, the pass's last takes the rest
    grown = [sizes for sizes in by_pass.values() if len(sizes) > 2]
    assert grown, by_pass
    for sizes in grown:
        assert max(sizes) > 5, sizes
        assert all(b == 2 * a for a, b in itertools.pairwise(sizes[:-1])), sizes


def test_abort_exits_resumable_and_a_rerun_finishes(realistic_db, tmp_path):
    run, events = start(realistic_db, tmp_path, "aborted")
    asked = toolkit(realistic_db, "control", "abort", "--reason", "window over")
    assert asked.exit_code == 0, asked.output
    code, _, err = run.wait()
    assert code == ExitCode.THROTTLED == 6, err
    assert "control abort" in err and "window over" in err and "run the same command again" in err
    assert realistic_db.scalar("SELECT outcome FROM toolkit.runs ORDER BY id DESC LIMIT 1") == "aborted"
    listed = toolkit(realistic_db, "history")
    assert "aborted" in listed.output and "was steered: abort by " in listed.output
    assert "window over" in listed.output
    assert lines_of(events)[-1]["exit_code"] == 6
    again = toolkit(realistic_db, "migrate", "milestone-1")
    assert again.exit_code == 0, again.output
    assert realistic_db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-1'") \
        == "verified"


def test_a_bad_set_is_refused_and_nothing_is_stored(realistic_db):
    for setting in ("batch-size=0", "pause-ms=soon", "chunk-size=5", "batch-size"):
        refused = toolkit(realistic_db, "control", "set", setting)
        assert refused.exit_code == 2, refused.output
        assert refused.output.count("\n") == 1 and refused.output.startswith("error: ")
    assert realistic_db.scalar("SELECT to_regclass('toolkit.run_controls')") is None


def test_with_no_run_going_the_request_is_refused_and_never_taken_later(realistic_db):
    refused = toolkit(realistic_db, "control", "abort")
    assert refused.exit_code == 3, refused.output
    assert "no toolkit run is going" in refused.output
    kept = realistic_db.rows("SELECT action, applied_at, applied_by, note FROM toolkit.run_controls")
    assert len(kept) == 1 and kept[0][0] == "abort" and kept[0][2] is None
    assert kept[0][1] is not None and kept[0][3] == "no run was going"
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0  # not aborted


def test_set_a_throttle_limit_reaches_a_run_that_waits_on_the_database(realistic_db, tmp_path):
    flag, events = tmp_path / "hold", tmp_path / "waiting.jsonl"
    flag.touch()  # the run waits on it, with no --max-throttle-s: for ever, but for the set
    run = start_toolkit(realistic_db, ("migrate", "milestone-1", "--throttle-flag-file", str(flag),
                                       "--events", str(events)), tmp_path, "waiting")
    wait_until(run, lambda: any(e["event"] == "throttle" for e in lines_of(events)))
    asked = toolkit(realistic_db, "control", "set", "max-throttle-s=0.5")
    assert asked.exit_code == 0, asked.output
    code, _, err = run.wait()
    assert code == ExitCode.THROTTLED, err
    taken = control_event(events, "set")
    assert taken["key"] == "max-throttle-s" and taken["before"] is None
    assert not batches(lines_of(events))


def test_a_paused_run_keeps_the_runner_lock_and_ctrl_c_still_stops_it(realistic_db, tmp_path):
    run, events = start(realistic_db, tmp_path, "held")
    assert toolkit(realistic_db, "control", "pause").exit_code == 0
    wait_until(run, lambda: control_event(events, "pause"))
    second = toolkit(realistic_db, "migrate", "milestone-1")
    assert second.exit_code == ExitCode.BUSY, second.output
    run.process.send_signal(signal.SIGINT)
    code, _, err = run.wait()
    assert code == ExitCode.INTERRUPTED, err
    assert realistic_db.scalar("SELECT outcome FROM toolkit.runs ORDER BY id DESC LIMIT 1") == "interrupted"


def test_a_run_takes_requests_made_after_it_started_only(realistic_db):
    """One left untaken before the run (a run killed first) is not its; one made after its
    history row (here: dated so, as one made while it took the lock and fingerprinted) is."""
    assert toolkit(realistic_db, "control", "pause").exit_code == 3  # creates the table
    realistic_db.execute("""
        INSERT INTO toolkit.run_controls (action, reason, requested_at)
        VALUES ('pause', 'left by a killed run', clock_timestamp() - interval '1 hour'),
               ('abort', 'made as the run started', clock_timestamp() + interval '1 hour')""")
    result = toolkit(realistic_db, "migrate", "milestone-1")
    assert result.exit_code == ExitCode.THROTTLED and "made as the run started" in result.output
    untaken = realistic_db.rows("SELECT reason FROM toolkit.run_controls WHERE applied_at IS NULL")
    assert [r[0] for r in untaken] == ["left by a killed run"]
