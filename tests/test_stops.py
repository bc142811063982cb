"""Stops during a server-side wait: Ctrl-C and SIGTERM act within a second and end as a
stop (exit 130, history ``interrupted``); a schema change's lock timeout names its option
and what it waited for; a killed run's index build left on the server is ended by the next
run, which names it and builds the index itself.

Every case is milestone 2 (a column added under ACCESS EXCLUSIVE, then an index built
CONCURRENTLY) on a copy of milestone 1's applied state, run as a real process, against a
session of the test's own that holds what the toolkit waits for: a lock on ml_candidates,
or a REPEATABLE READ transaction's snapshot, which CREATE INDEX CONCURRENTLY waits for
(``virtualxid``). The requirement is a second; the tests allow 3 s on a loaded machine.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from faults import Running, newest_run_id, start_toolkit
from helpers import TALLY, differences, end_state, toolkit

from toolkit.errors import ExitCode

INDEX = "index_ml_candidates_on_model_id"
# Long enough that the toolkit is still waiting when the test acts.
WAIT = ("--ddl-lock-timeout-ms", "60000")
ACTED_WITHIN_S = 3.0
SESSION_NAME = re.compile(r"toolkit run \d+ token \d+")
_twin: dict[str, tuple] = {}


@pytest.fixture
def m2_db(before_milestone):
    return before_milestone(2)


@pytest.fixture
def twin(before_milestone) -> tuple:
    """The end state of milestone 2 migrated without a stop, on its own copy (once)."""
    if "state" not in _twin:
        db = before_milestone(2)
        done = toolkit(db, "migrate", "milestone-2", "--yes")
        assert done.exit_code == 0, done.output
        _twin["state"] = end_state(db)
    return _twin["state"]


@contextmanager
def holding(db, application: str, *sql: str, repeatable_read: bool = False) -> Iterator[int]:
    """A session of the test's own, in a transaction that ran ``sql``; yields its pid and
    rolls back when the block ends."""
    conn = psycopg.connect(db.url_text, application_name=application)
    try:
        if repeatable_read:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        for statement in sql or ("SELECT 1",):
            conn.execute(statement)
        yield conn.info.backend_pid
    finally:
        conn.rollback()
        conn.close()


def waiting_toolkit_backend(db, run: Running, wait_event: str, timeout_s: float = 60) -> tuple[int, str]:
    """The toolkit's backend once it waits on the server (``relation``: a table lock;
    ``virtualxid``: CREATE INDEX CONCURRENTLY waiting for an old snapshot)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = db.rows("""
            SELECT pid, application_name FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = :w
              AND application_name LIKE 'toolkit%'""", w=wait_event)
        if found:
            return found[0][0], found[0][1]
        if run.process.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.process.returncode}) before waiting on "
                                 f"{wait_event}: {run.stderr.read_text()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"the toolkit did not wait on {wait_event} in {timeout_s}s")


def stopped_in_time(run: Running, signalled_at: float) -> tuple[int, str]:
    code, _, stderr = run.wait(30)
    took = time.monotonic() - signalled_at
    assert took < ACTED_WITHIN_S, f"the run took {took:.1f}s to stop after the signal: {stderr}"
    assert code == ExitCode.INTERRUPTED, f"exit {code}: {stderr}"
    assert "Traceback" not in stderr and "PendingRollbackError" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run the same command again" in errors[0], stderr
    return code, stderr


def last_run(db) -> tuple[str, str]:
    return tuple(db.rows("SELECT outcome, coalesce(error, '') FROM toolkit.runs ORDER BY id DESC LIMIT 1")[0])


def still_on_server(db, pid: int) -> bool:
    return bool(db.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = :p AND state = 'active'",
                          p=pid))


def test_a_second_sigint_during_an_index_build_waiting_on_an_old_snapshot_stops_at_once(
        m2_db, twin, tmp_path: Path):
    db = m2_db
    with holding(db, "reporting", repeatable_read=True):
        run = start_toolkit(db, ("migrate", "milestone-2", "--yes", *WAIT), tmp_path, "stopped")
        pid, name = waiting_toolkit_backend(db, run, "virtualxid")
        assert SESSION_NAME.fullmatch(name), name  # the run's token, in its sessions' name
        run.process.send_signal(signal.SIGINT)
        said_at = time.monotonic() + ACTED_WITHIN_S  # the first is taken (two at once are one)
        while "warning: stopping after the current batch" not in run.stderr.read_text():
            assert time.monotonic() < said_at, run.stderr.read_text()
            time.sleep(0.01)
        run.process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        stopped_in_time(run, signalled)
        # the build was cancelled on the server, not left waiting there
        assert not still_on_server(db, pid)
        TALLY["runs stopped by a second SIGINT during CREATE INDEX CONCURRENTLY"] += 1
    outcome, error = last_run(db)
    assert outcome == "interrupted", error
    assert "CREATE INDEX CONCURRENTLY" in error, error

    resumed = toolkit(db, "migrate", "milestone-2", "--yes")
    assert resumed.exit_code == 0, resumed.output
    state = end_state(db)
    assert state == twin, differences(state, twin)


def test_one_sigterm_during_a_schema_changes_lock_wait_stops_within_a_second(m2_db, twin, tmp_path: Path):
    db = m2_db
    with holding(db, "gitlab-puma", "SELECT count(*) FROM ml_candidates"):
        run = start_toolkit(db, ("migrate", "milestone-2", "--yes", *WAIT), tmp_path, "stopped")
        pid, _ = waiting_toolkit_backend(db, run, "relation")
        run.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stopped_in_time(run, signalled)
        assert not still_on_server(db, pid)
        # the ALTER TABLE was rolled back: no column, nothing half-done
        assert not db.scalar("""SELECT count(*) FROM information_schema.columns
                                WHERE table_name = 'ml_candidates' AND column_name = 'model_id'""")
        TALLY["runs stopped by one SIGTERM during a schema change's lock wait"] += 1
    outcome, error = last_run(db)
    assert outcome == "interrupted" and "ALTER TABLE" in error, error

    resumed = toolkit(db, "migrate", "milestone-2", "--yes")
    assert resumed.exit_code == 0, resumed.output
    state = end_state(db)
    assert state == twin, differences(state, twin)


@pytest.mark.parametrize("blocker", ["table lock", "old snapshot"])
def test_a_schema_changes_lock_timeout_names_its_option_and_what_it_waited_for(m2_db, blocker: str):
    db = m2_db
    if blocker == "table lock":
        holder = holding(db, "gitlab-sidekiq", "SELECT count(*) FROM ml_candidates")
    else:
        holder = holding(db, "reporting", repeatable_read=True)
    with holder as pid:
        done = toolkit(db, "migrate", "milestone-2", "--yes", "--ddl-lock-timeout-ms", "50",
                       "--ddl-retries", "1")
        held_for = db.scalar("SELECT extract(epoch FROM clock_timestamp() - xact_start)::int "
                             "FROM pg_stat_activity WHERE pid = :p", p=pid)
    assert done.exit_code == ExitCode.LOCKED, done.output
    (line,) = [line for line in done.output.splitlines() if line.startswith("error:")]
    step = "add-model-id-column" if blocker == "table lock" else "index-model-id"
    assert line.startswith(f"error: {step}: lock timeout in 2 tries (--ddl-lock-timeout-ms 50 each)"), line
    assert "--ddl-lock-timeout-ms raises the wait per try" in line and "--lock-timeout-ms" not in \
        line.replace("--ddl-lock-timeout-ms", ""), line
    if blocker == "table lock":
        assert f"pid {pid} (gitlab-sidekiq, user " in line and "AccessShareLock on ml_candidates" in line, line
    else:
        assert f"an old snapshot: pid {pid} (reporting, user " in line, line
        assert f"idle in transaction, its transaction open for {held_for} s" in line \
            or f"open for {held_for - 1} s" in line, line
    assert "none visible now" not in line


def test_an_index_build_left_by_a_killed_run_is_ended_and_named_by_the_next_run(m2_db, twin,
                                                                                tmp_path: Path):
    db = m2_db
    prior = newest_run_id(db)
    with holding(db, "reporting", repeatable_read=True):
        killed = start_toolkit(db, ("migrate", "milestone-2", "--yes", *WAIT), tmp_path, "killed")
        orphan, name = waiting_toolkit_backend(db, killed, "virtualxid")
        killed.process.kill()
        killed.process.wait(10)
        time.sleep(0.5)
        # what the fault leaves: the build goes on waiting on the server, under the run's token
        assert still_on_server(db, orphan), "the killed run's index build ended by itself"
        assert SESSION_NAME.fullmatch(name), name

        following = start_toolkit(db, ("migrate", "milestone-2", "--yes", *WAIT), tmp_path, "next")
        deadline = time.monotonic() + 60
        while still_on_server(db, orphan):
            assert time.monotonic() < deadline, "the next run did not end the orphaned build"
            assert following.process.poll() is None, following.stderr.read_text()
            time.sleep(0.05)
        # only now may the old snapshot go: the orphan could otherwise have built the index
    code, _, stderr = following.wait(120)
    assert code == 0, stderr
    TALLY["orphaned index builds ended by the next run"] += 1
    (said,) = [line for line in stderr.splitlines() if "terminated 1 session(s) of earlier runs" in line]
    assert f"pid {orphan} ({name}, active for " in said and "virtualxid" in said, said
    assert "CREATE INDEX CONCURRENTLY" in said, said
    assert db.scalar("""SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                        WHERE c.relname = :n""", n=INDEX)
    runs = db.rows("SELECT outcome FROM toolkit.runs WHERE id > :p ORDER BY id", p=prior)
    assert [r[0] for r in runs] == ["stopped unrecorded", "succeeded"], runs
    state = end_state(db)
    assert state == twin, differences(state, twin)


def test_sigterm_while_waiting_for_the_runner_lock_stops_with_exit_130(m2_db, tmp_path: Path):
    """Outside a run's batches too (here: waiting for another run's lock), SIGTERM is a stop
    as Ctrl-C is, not the default action that ends the process without a word."""
    db = m2_db
    with holding(db, "reporting", repeatable_read=True):
        first = start_toolkit(db, ("migrate", "milestone-2", "--yes", *WAIT), tmp_path, "first")
        waiting_toolkit_backend(db, first, "virtualxid")
        runs = db.scalar("SELECT count(*) FROM toolkit.runs")
        second = start_toolkit(db, ("migrate", "milestone-2", "--yes", "--lock-wait", "60"), tmp_path,
                               "second")
        deadline = time.monotonic() + 30
        while "waiting up to 60 s (--lock-wait)" not in second.stderr.read_text():
            assert time.monotonic() < deadline and second.process.poll() is None, second.stderr.read_text()
            time.sleep(0.02)
        second.process.send_signal(signal.SIGTERM)
        stopped_in_time(second, time.monotonic())
        assert db.scalar("SELECT count(*) FROM toolkit.runs") == runs  # it wrote nothing
        first.process.send_signal(signal.SIGTERM)
        stopped_in_time(first, time.monotonic())
    assert last_run(db)[0] == "interrupted"


def test_milestone_4s_index_build_stops_at_once_and_its_lock_timeout_names_the_old_snapshot(
        before_milestone, tmp_path: Path):
    """Milestone 4's CREATE UNIQUE INDEX CONCURRENTLY, after its archive and its NOT NULL
    changes, held up by an old snapshot: SIGTERM stops it at once (exit 130, rolled back on
    the server); with short waits its retries end naming the snapshot and the option."""
    db = before_milestone(4)
    with holding(db, "reporting", repeatable_read=True) as pid:
        run = start_toolkit(db, ("migrate", "milestone-4", "--yes", *WAIT), tmp_path, "stopped")
        backend, _ = waiting_toolkit_backend(db, run, "virtualxid")
        run.process.send_signal(signal.SIGTERM)
        stopped_in_time(run, time.monotonic())
        assert not still_on_server(db, backend)
        outcome, error = last_run(db)
        assert outcome == "interrupted" and "CREATE UNIQUE INDEX CONCURRENTLY" in error, error

        done = toolkit(db, "migrate", "milestone-4", "--yes", "--ddl-lock-timeout-ms", "50",
                       "--ddl-retries", "2")
    assert done.exit_code == ExitCode.LOCKED, done.output
    (line,) = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert "lock timeout in 3 tries (--ddl-lock-timeout-ms 50 each)" in line, line
    assert f"an old snapshot: pid {pid} (reporting, user " in line, line
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0


def test_one_sigint_during_a_batch_waiting_for_a_row_lock_stops_within_a_second(before_milestone,
                                                                                tmp_path: Path):
    """A batch held up by rows GitLab has locked (its lock_timeout raised so it would wait a
    minute): the first Ctrl-C gives it half a second, then cancels it on the server; the
    batch is rolled back with its checkpoint, and the next run resumes."""
    db = before_milestone(1)
    with holding(db, "gitlab-sidekiq", "SELECT id FROM packages_packages FOR UPDATE"):
        run = start_toolkit(db, ("migrate", "milestone-1", "--lock-timeout-ms", "60000"), tmp_path,
                            "stopped")
        waiting_toolkit_backend(db, run, "transactionid")
        run.process.send_signal(signal.SIGINT)
        stopped_in_time(run, time.monotonic())
    outcome, error = last_run(db)
    assert outcome == "interrupted" and "cancelled on the server" in error, error
    assert db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == \
        db.scalar("SELECT coalesce(sum(rows_done), 0) FROM toolkit.checkpoints")
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
