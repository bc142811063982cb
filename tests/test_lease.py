"""The exclusive right to run, when the database takes the runner lock's session away.

Each test ends a real session the way production does (``pg_terminate_backend`` as a DBA
would, ``idle_session_timeout``) and counts, exactly, the commits the run made after it
lost its hold: the count is read while holding the lease row FOR UPDATE, which waits for
any commit that had already passed its check, so "0" is not a matter of timing.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa
from helpers import TALLY, toolkit_process

from toolkit.db import create_engine
from toolkit.engine.lease import Hold, HoldLost
from toolkit.errors import ExitCode
from toolkit.schema.migrations import ensure_own_tables
from toolkit.verify.fingerprint import take

SLOW = ("--batch-size", "2", "--pause-ms", "150")


def _end_state(db) -> tuple:
    with db.engine.connect() as conn:
        fingerprint = take(conn)
        conn.rollback()
    ledger = db.rows("SELECT package_id, previous_package_type FROM toolkit.m1_converted_packages "
                     "ORDER BY 1") if db.scalar("SELECT to_regclass('toolkit.m1_converted_packages')") else []
    return fingerprint.tables, fingerprint.mlflow, ledger


def _start(db, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toolkit", "--database-url", db.url_text, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_batches(db, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.scalar("SELECT to_regclass('toolkit.checkpoints') IS NOT NULL") and \
                (db.scalar("SELECT max(batches_done) FROM toolkit.checkpoints") or 0) >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not commit {at_least} batches in {timeout}s")


def _terminate_lock_session(db, verb: str) -> int:
    pid = db.scalar("SELECT pid FROM pg_stat_activity WHERE application_name = :n",
                    n=f"toolkit {verb} milestone-1")
    assert pid, "the lock session is visible by its application_name"
    assert db.scalar("SELECT pg_terminate_backend(:p, 5000)", p=pid)
    TALLY["runner lock sessions terminated"] += 1
    return pid


def _batches_committed_now(db) -> int:
    """Every batch committed so far, counting one whose commit had passed its check: the
    lease row FOR UPDATE waits for that commit's share lock."""
    with db.engine.begin() as conn:
        conn.execute(sa.text("SELECT 1 FROM toolkit.runner_lease WHERE id = 1 FOR UPDATE"))
        return conn.execute(sa.text("SELECT batches_done FROM toolkit.checkpoints")).scalar_one()


def test_a_run_whose_lock_session_is_terminated_commits_nothing_more_and_resumes_to_the_twin(make_database):
    db, twin = make_database("realistic:small"), make_database("realistic:small")
    assert toolkit_process(twin, "migrate", "milestone-1", *SLOW[:2]).returncode == 0

    run = _start(db, "migrate", "milestone-1", *SLOW)
    _wait_for_batches(db, 3)
    _terminate_lock_session(db, "migrate")
    committed_at_loss = _batches_committed_now(db)
    _, stderr = run.communicate(timeout=60)

    assert run.returncode == ExitCode.SESSION_LOST, stderr
    assert "lost the runner lock" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    after = db.scalar("SELECT batches_done FROM toolkit.checkpoints") - committed_at_loss
    TALLY["commits after a lost hold (must be 0)"] += after
    assert after == 0
    outcome, rows, error = db.rows("SELECT outcome, rows_by_step, error FROM toolkit.runs")[0]
    assert outcome == "interrupted" and "lost the runner lock" in error
    assert sum(rows.values()) == db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages")
    assert db.scalar("SELECT state FROM toolkit.milestones") == "in_progress"

    resumed = toolkit_process(db, "migrate", "milestone-1", "--batch-size", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert db.scalar("SELECT state FROM toolkit.milestones") == "verified"
    assert _end_state(db) == _end_state(twin)
    TALLY["rows compared with an uninterrupted twin (lease)"] += sum(
        t["rows"] for t in _end_state(db)[0].values() if t)


@pytest.mark.parametrize("rival", ["migrate", "rollback"])
def test_a_rival_admitted_after_the_lock_session_ended_is_the_only_one_that_commits(make_database, rival):
    """The issue's corruption: a rollback admitted while a migrate ran on. Now the migrate
    commits nothing once the rival has claimed the lease, and the rival's result is true."""
    db, twin = make_database("realistic:small"), make_database("realistic:small")
    original = _end_state(twin)
    assert toolkit_process(twin, "migrate", "milestone-1").returncode == 0

    first = _start(db, "migrate", "milestone-1", *SLOW)
    _wait_for_batches(db, 3)
    _terminate_lock_session(db, "migrate")
    second = toolkit_process(db, rival, "milestone-1")
    _, stderr = first.communicate(timeout=60)

    assert second.returncode == 0, second.stderr
    assert first.returncode == ExitCode.SESSION_LOST, stderr
    assert "lost the runner lock" in stderr and "Traceback" not in stderr
    runs = db.rows("SELECT command, outcome FROM toolkit.runs ORDER BY id")
    assert runs[0] == ("toolkit migrate milestone-1 --batch-size=2 --pause-ms=150", "interrupted")
    assert runs[1][1] == "succeeded"
    if rival == "migrate":
        assert db.scalar("SELECT state FROM toolkit.milestones") == "verified"
        assert _end_state(db) == _end_state(twin)
    else:
        assert db.scalar("SELECT state FROM toolkit.milestones") == "rolled_back"
        assert _end_state(db)[:2] == original[:2]  # every package back as it was
        assert db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == 0
        again = toolkit_process(db, "migrate", "milestone-1")
        assert again.returncode == 0, again.stderr
        assert _end_state(db) == _end_state(twin)


def test_idle_session_timeout_shorter_than_the_run_does_not_end_it(make_database):
    db, twin = make_database("realistic:small"), make_database("realistic:small")
    assert toolkit_process(twin, "migrate", "milestone-1").returncode == 0
    db.execute(f'ALTER DATABASE "{db.name}" SET idle_session_timeout = \'400ms\'')
    db.engine.dispose()
    started = time.monotonic()
    run = toolkit_process(db, "migrate", "milestone-1", "--batch-size", "2", "--pause-ms", "100")
    took = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    assert took > 1.5, "the run must outlast the timeout several times over for this to mean anything"
    assert db.scalar("SELECT outcome FROM toolkit.runs") == "succeeded"
    assert _end_state(db) == _end_state(twin)
    # and the setting is real: an idle session of our own is ended by it
    with db.engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        conn.commit()
        time.sleep(0.8)
        with pytest.raises(sa.exc.DBAPIError):
            conn.execute(sa.text("SELECT 1"))


def _claimed_hold(db, label: str) -> Hold:
    """A hold on an engine of its own, as each toolkit process has."""
    hold = Hold(create_engine(db.url), label, wait_s=0).__enter__()
    with hold.engine.connect() as conn:
        ensure_own_tables(conn)
        hold.claim(conn)
    return hold


def test_a_commit_after_the_lock_session_ended_is_refused_and_rolled_back(legacy_db):
    db = legacy_db
    db.execute("INSERT INTO projects (id, name) VALUES (1, 'p')")  # any GitLab row will do
    hold = _claimed_hold(db, "toolkit test")
    try:
        db.scalar("SELECT pg_terminate_backend(:p, 5000)", p=hold.lock_pid)
        with hold.engine.connect() as conn:
            conn.execute(sa.text("DELETE FROM projects WHERE id = 1"))
            with pytest.raises(HoldLost, match=r"its lock session .* ended") as lost:
                conn.commit()
            assert not lost.value.taken_over
    finally:
        hold.__exit__(None, None, None)
        hold.engine.dispose()
    assert db.scalar("SELECT count(*) FROM projects WHERE id = 1") == 1


def test_a_new_holder_waits_for_a_commit_that_passed_its_check_and_fences_the_next(legacy_db):
    """The window between a check and its commit: the rival cannot claim inside it."""
    db = legacy_db
    db.execute("INSERT INTO projects (id, name) VALUES (1, 'p'), (2, 'q')")
    first = _claimed_hold(db, "toolkit first")
    conn = first.engine.connect()
    claimed = threading.Event()
    second: list[Hold] = []
    try:
        conn.execute(sa.text("DELETE FROM projects WHERE id = 1"))
        first.check(conn)  # passed; the share lock on the lease row is held until commit
        db.scalar("SELECT pg_terminate_backend(:p, 5000)", p=first.lock_pid)

        def rival() -> None:
            second.append(_claimed_hold(db, "toolkit second"))
            claimed.set()

        thread = threading.Thread(target=rival)
        thread.start()
        time.sleep(0.5)
        assert not claimed.is_set(), "the rival claimed the lease inside the first run's commit"
        waiting = db.scalar("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'")
        assert waiting == 1
        # The instant after a check passed: the driver's commit, as the fence's own commit does.
        conn.connection.dbapi_connection.commit()
        conn.rollback()
        thread.join(10)
        assert claimed.is_set()
        conn.execute(sa.text("DELETE FROM projects WHERE id = 2"))
        with pytest.raises(HoldLost, match="another run took it over") as lost:
            conn.commit()
        assert lost.value.taken_over
    finally:
        conn.close()
        for hold in (first, *second):
            hold.__exit__(None, None, None)
            hold.engine.dispose()
    assert db.rows("SELECT id FROM projects ORDER BY id") == [(2,)]


def test_a_second_run_names_the_first_by_its_client_host_pid_and_command(realistic_db):
    db = realistic_db
    first = _start(db, "migrate", "milestone-1", *SLOW)
    try:
        _wait_for_batches(db, 1)
        second = toolkit_process(db, "migrate", "milestone-1", "--lock-wait", "0.5")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert second.returncode == ExitCode.BUSY, second.stderr
    client = f"toolkit migrate milestone-1 (pid {first.pid} on {socket.gethostname()})"
    said = [line for line in second.stderr.splitlines() if not line.startswith("Using ")]
    waiting, error = said[0], said[-1]
    assert client in waiting and "waiting up to 0.5 s" in waiting
    assert client in error and "pg_terminate_backend(" in error and "Ctrl-C in its terminal" in error
    assert db.scalar("SELECT count(*) FROM toolkit.runs") == 1  # the second one wrote nothing

