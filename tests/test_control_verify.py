"""``toolkit control pause|abort`` reach a run in its closing verify, read between its checks:
a pause lets go of the verify's snapshot, `toolkit status` shows the run paused in its verify
phase, and after the resume the verify runs again and the milestone is recorded verified; an
abort stops the run with the resumable exit code, the milestone applied and not verified,
and the same command run again verifies it.

To send the request while the run is verifying, and not before, a test session holds an
ACCESS EXCLUSIVE lock on ``toolkit.fingerprints`` from the run's first batch on: only the
verify's comparison with the fingerprint reads it, so the passes go on and the verify waits
there; the request is made once the run says it began its verify, then the lock is let go.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from faults import Running, start_toolkit
from helpers import toolkit, toolkit_json
from test_control import _end_runs_left as _end_runs_left  # the autouse fixture
from test_control import _started, batches, control_event, lines_of, wait_until

from toolkit.errors import ExitCode


def _phase(events: Path, phase: str) -> bool:
    return any(e["event"] == "phase" and e["phase"] == phase for e in lines_of(events))


@contextmanager
def verifying(db, tmp_path: Path, tag: str) -> Iterator[tuple[Running, Path]]:
    """A milestone-1 run that has begun its closing verify and waits in it until the body
    has made its request."""
    events = tmp_path / f"{tag}.jsonl"
    run = start_toolkit(db, ("migrate", "milestone-1", "--batch-size", "5", "--pause-ms", "50",
                             "--events", str(events)), tmp_path, tag)
    _started.append(run)
    wait_until(run, lambda: batches(lines_of(events)))  # its fingerprint is taken and saved
    with db.engine.connect() as lock:
        lock.execute(sa.text("LOCK TABLE toolkit.fingerprints IN ACCESS EXCLUSIVE MODE"))
        wait_until(run, lambda: _phase(events, "verify"))
        yield run, events
        lock.rollback()


def _state(db) -> str:
    return db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-1'")


def test_a_pause_during_verify_holds_the_run_and_resume_verifies_it(realistic_db, tmp_path):
    with verifying(realistic_db, tmp_path, "paused") as (run, events):
        assert toolkit(realistic_db, "control", "pause", "--reason", "replica first").exit_code == 0
    wait_until(run, lambda: control_event(events, "pause"))
    code, doc = toolkit_json(realistic_db, "status")
    assert code == 0 and doc["result"]["run"]["phase"] == "verify"
    assert doc["result"]["paused"]["reason"] == "replica first"
    assert _state(realistic_db) == "applied"  # not recorded verified while paused

    assert toolkit(realistic_db, "control", "resume").exit_code == 0
    code, _, err = run.wait()
    assert code == 0, err
    order = [e.get("phase") or e.get("action") or e["event"] for e in lines_of(events)]
    assert order.index("verify") < order.index("pause") < order.index("resume") < order.index("run_end")
    assert _state(realistic_db) == "verified"


def test_an_abort_during_verify_exits_resumable_and_a_rerun_verifies(realistic_db, tmp_path):
    with verifying(realistic_db, tmp_path, "aborted") as (run, events):
        assert toolkit(realistic_db, "control", "abort", "--reason", "window over").exit_code == 0
    code, _, err = run.wait()
    assert code == ExitCode.THROTTLED == 6, err
    assert "during its closing verify" in err and "window over" in err, err
    assert control_event(events, "abort")["reason"] == "window over"
    assert lines_of(events)[-1]["exit_code"] == 6
    assert realistic_db.scalar("SELECT outcome FROM toolkit.runs ORDER BY id DESC LIMIT 1") == "aborted"
    assert _state(realistic_db) == "applied"

    again = toolkit(realistic_db, "migrate", "milestone-1")
    assert again.exit_code == 0, again.output
    assert _state(realistic_db) == "verified"
