"""Throttling on the database's health (health.py): a run waits before each batch while a
signal is over its limit, and goes on once it is not. Real components only: a streaming
replica whose replay is paused, a transaction held open in another session, a flag file,
a throttle query, a VACUUM slowed down by its cost delay, a role without pg_monitor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from helpers import resolve_m1_anomalies, toolkit
from replication import Replication

from toolkit.db import create_engine, parse_url
from toolkit.engine import health
from toolkit.engine.budget import Budget
from toolkit.engine.settings import RunOptions
from toolkit.engine.throttle import Throttle
from toolkit.errors import ExitCode
from toolkit.output import configure
from toolkit.sandbox.server import SANDBOX_DATABASE

MILESTONE = "milestone-1"
RUN = ("migrate", MILESTONE, "--batch-size", "2", "--pause-ms", "20")


def _batches(db) -> int:
    if db.scalar("SELECT to_regclass('toolkit.checkpoints')") is None:
        return 0
    return db.scalar("SELECT coalesce(sum(batches_done), 0)::int FROM toolkit.checkpoints "
                     "WHERE milestone = :m", m=MILESTONE)


@contextmanager
def _run(url: str, log: Path, *extra: str) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "TOOLKIT_DATABASE_URL": url, "TOOLKIT_PROGRESS_EVERY_S": "1"}
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "toolkit", *RUN, *extra], env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for(log: Path, process: subprocess.Popen, *words: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = log.read_text()
        if all(w in text for w in words):
            return text
        assert process.poll() is None, f"the run ended before saying {words}: {text}"
        assert time.monotonic() < deadline, f"not said in {timeout_s:.0f} s: {words}: {text}"
        time.sleep(0.05)


def _held_then_released(db, process: subprocess.Popen, log: Path, words: tuple[str, ...],
                        release) -> str:
    """The run says it waits, commits no batch for a while, and completes once released."""
    _wait_for(log, process, *words)
    time.sleep(1.5)
    assert process.poll() is None, log.read_text()
    assert _batches(db) == 0, "a batch was committed while the run should wait"
    release()
    code = process.wait(timeout=60)
    output = log.read_text()
    assert code == 0, output
    assert "Traceback" not in output, output
    return output


def _throttled_in_history(db, signal: str) -> float:
    options = db.scalar("SELECT options FROM toolkit.runs ORDER BY id DESC LIMIT 1")
    return options["throttled_seconds"].get(signal, 0.0)


@pytest.fixture
def m1_db(realistic_db):
    resolve_m1_anomalies(realistic_db)
    return realistic_db


def test_a_paused_replica_holds_the_run_until_its_replay_resumes(tmp_path):
    with Replication.started() as pair:
        pair.seed("realistic", "small")
        db = pair.on_primary()
        resolve_m1_anomalies(db)
        pair.wait_replayed()
        replica = pair.on_replica()
        replica.scalar("SELECT pg_wal_replay_pause()")
        # about 2 MB of WAL the replica has not replayed (the run's own writes add more)
        db.execute("CREATE TABLE filler AS SELECT repeat('x', 1000) AS x FROM generate_series(1, 2000)")
        log = tmp_path / "run.log"
        url = pair.primary_status.url(SANDBOX_DATABASE).replace("+psycopg", "")
        with _run(url, log, "--max-replica-lag-bytes", "262144") as process:
            output = _held_then_released(db, process, log, ("waiting before", "replica", "behind"),
                                         lambda: replica.scalar("SELECT pg_wal_replay_resume()"))
        assert "limit 1.5 s / 256.0 kB" in output, output
        assert _throttled_in_history(db, "replica_lag") >= 1.5
        assert toolkit(db, "verify", MILESTONE).exit_code == 0
        # the reader sees a replica not replaying, measured in bytes
        replica.scalar("SELECT pg_wal_replay_pause()")
        db.execute("INSERT INTO filler SELECT repeat('y', 1000) FROM generate_series(1, 500)")
        lag = next(r for r in health.readings_now(db.engine, ("ml_candidates",),
                                              health.Limits(max_replica_lag_bytes=1000))
               if r.signal == "replica_lag")
        assert lag.over and "kB behind" in lag.detail, lag
        replica.scalar("SELECT pg_wal_replay_resume()")


def test_a_long_transaction_in_another_session_holds_the_run_until_it_commits(m1_db, tmp_path):
    holder = psycopg.connect(m1_db.url_text, application_name="gitlab-sidekiq")
    try:
        holder.execute("SELECT txid_current()")  # BEGIN (psycopg's implicit transaction) and keep it
        time.sleep(1.2)
        log = tmp_path / "run.log"
        with _run(m1_db.url_text, log, "--max-transaction-age-s", "1") as process:
            output = _held_then_released(m1_db, process, log,
                                         ("waiting before", "long transaction", "gitlab-sidekiq"),
                                         holder.commit)
        assert "limit 1 s" in output
        assert _throttled_in_history(m1_db, "long_transaction") >= 1.5
    finally:
        holder.close()


def test_a_flag_file_holds_the_run_until_it_is_removed(m1_db, tmp_path):
    flag = tmp_path / "pause"
    flag.touch()
    log = tmp_path / "run.log"
    with _run(m1_db.url_text, log, "--throttle-flag-file", str(flag)) as process:
        output = _held_then_released(m1_db, process, log, ("waiting before", "flag file", "exists"),
                                     flag.unlink)
    assert "resuming" in output
    assert _throttled_in_history(m1_db, "flag_file") >= 1.5


def test_max_throttle_stops_with_its_own_exit_code_and_the_same_command_resumes(m1_db):
    before = m1_db.scalar("SELECT count(*) FROM packages_packages WHERE package_type = 14")
    began = time.monotonic()
    result = toolkit(m1_db, "--json", *RUN, "--throttle-query", "SELECT true", "--max-throttle-s", "2")
    assert result.exit_code == ExitCode.THROTTLED, result.output
    assert 2 <= time.monotonic() - began < 20
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == ExitCode.THROTTLED and "max-throttle-s" in doc["error"]["problem"]
    assert doc["error"]["details"]["throttled_seconds"]["throttle_query"] >= 2
    # nothing half-done: no batch, no package converted; history says so
    assert _batches(m1_db) == 0
    assert m1_db.scalar("SELECT count(*) FROM packages_packages WHERE package_type = 14") == before
    outcome, options = m1_db.rows("SELECT outcome, options FROM toolkit.runs ORDER BY id DESC LIMIT 1")[0]
    assert outcome == "throttled" and options["throttled_seconds"]["throttle_query"] >= 2

    again = toolkit(m1_db, "--json", *RUN)
    assert again.exit_code == 0, again.output
    doc = json.loads(again.stdout)
    assert doc["result"]["complete"] and doc["result"]["verify"]["ok"]
    assert doc["result"]["throttled_seconds"] == {}


def test_a_throttle_query_that_does_not_run_is_a_usage_error(m1_db):
    result = toolkit(m1_db, *RUN, "--throttle-query", "SELECT nonsense FROM nowhere")
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "--throttle-query does not run" in result.output
    assert _batches(m1_db) == 0


@contextmanager
def _slow_vacuum(db, table: str) -> Iterator[int]:
    """A VACUUM of ``table`` in another session, slowed down by its cost delay (100 ms
    after every page or so); yields its pid, cancels it on the way out."""
    conn = psycopg.connect(db.url_text, autocommit=True, application_name="dba-vacuum")
    pid = conn.info.backend_pid
    conn.execute("SET vacuum_cost_delay = 100")
    conn.execute("SET vacuum_cost_limit = 1")
    errors: list[Exception] = []

    def vacuum() -> None:
        try:
            conn.execute(f"VACUUM (DISABLE_PAGE_SKIPPING) {table}")
        except psycopg.errors.QueryCanceled:
            pass
        except Exception as exc:  # pragma: no cover - said in the assertion below
            errors.append(exc)

    thread = threading.Thread(target=vacuum, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not db.scalar("SELECT count(*) FROM pg_stat_progress_vacuum WHERE pid = :p", p=pid):
        assert time.monotonic() < deadline and thread.is_alive(), errors or "the VACUUM did not start"
        time.sleep(0.02)
    try:
        yield pid
    finally:
        db.scalar("SELECT pg_cancel_backend(:p)", p=pid)
        thread.join(timeout=10)
        conn.close()
    assert not errors, errors


def test_a_vacuum_of_the_passs_table_holds_the_run_until_it_ends(m1_db, tmp_path):
    m1_db.execute("UPDATE ml_candidates SET updated_at = updated_at")  # dead tuples: pages to visit
    with _slow_vacuum(m1_db, "ml_candidates") as pid:
        readings = {r.signal: r for r in health.readings_now(m1_db.engine, ("ml_candidates",))}
        assert readings["vacuum"].over, readings
        assert "a VACUUM is running on ml_candidates" in readings["vacuum"].detail
        other = {r.signal: r for r in health.readings_now(m1_db.engine, ("ml_models",))}
        assert not other["vacuum"].over, other
        log = tmp_path / "run.log"
        with _run(m1_db.url_text, log) as process:
            _held_then_released(m1_db, process, log, ("waiting before", "VACUUM", "ml_candidates"),
                                lambda: m1_db.scalar("SELECT pg_cancel_backend(:p)", p=pid))
    assert _throttled_in_history(m1_db, "vacuum") >= 1.5


@pytest.fixture
def plain_role(m1_db) -> Iterator[str]:
    """A login role without pg_monitor that may run milestone 1 (trust auth: local server)."""
    name = "tk_no_monitor"
    m1_db.execute(f"DROP ROLE IF EXISTS {name}")
    m1_db.execute(f"CREATE ROLE {name} LOGIN")
    m1_db.execute(f"GRANT ALL ON SCHEMA public TO {name}; GRANT ALL ON ALL TABLES IN SCHEMA public TO {name}; "
                  f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {name}; "
                  f'GRANT ALL ON DATABASE "{m1_db.name}" TO {name}')
    try:
        yield name
    finally:
        m1_db.execute(f"DROP OWNED BY {name}")
        m1_db.execute(f"DROP ROLE {name}")


def test_a_role_without_pg_monitor_is_warned_once_at_start(m1_db, plain_role):
    url = m1_db.url.set(username=plain_role, password=None)
    engine = create_engine(parse_url(url.render_as_string(hide_password=False)))
    try:
        shown = configure()  # the terminal, handed to the run as its events (as the CLI does)
        throttle = Throttle(engine, health.Limits(), Budget(RunOptions(), events=shown))
        throttle.start()
        throttle.wait(("ml_candidates",), "a test")
        throttle.wait(("ml_candidates",), "a test")
        assert len(shown.warnings) == 1, shown.warnings
        assert "not a member of pg_monitor" in shown.warnings[0] and plain_role in shown.warnings[0]
    finally:
        engine.dispose()
    # a whole run as that role: the one warning, then the run as usual
    as_role = type("AsRole", (), {"url_text": url.render_as_string(hide_password=False)
                                  .replace("postgresql+psycopg", "postgresql")})()
    result = toolkit(as_role, "--json", *RUN)
    doc = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    said = [w for w in doc["warnings"] if "pg_monitor" in w]
    assert len(said) == 1 and said[0].startswith("throttling: role 'tk_no_monitor'"), doc["warnings"]
    # and a superuser (every test database's own) is not warned
    shown = configure()
    Throttle(m1_db.engine, health.Limits(), Budget(RunOptions(), events=shown)).start()
    assert shown.warnings == []


def test_plan_lists_the_health_readings(m1_db, tmp_path):
    flag = tmp_path / "pause"
    flag.touch()
    result = toolkit(m1_db, "plan", MILESTONE, "--no-sql")
    assert result.exit_code == 0, result.output
    assert "Database health now" in result.output and "replica lag: ok: no replica attached" in result.output
    doc = json.loads(toolkit(m1_db, "--json", "plan", MILESTONE).stdout)
    signals = {r["signal"]: r for r in doc["result"]["health"]}
    assert set(signals) >= {"replica_lag", "vacuum", "long_transaction", "archiving"}
    assert not any(r["over"] for r in signals.values()), signals


def test_a_schema_change_waits_too(m1_db, tmp_path):
    """Before each schema change as before each batch: milestone 2's first change (a column
    on ml_candidates) waits while the flag file exists, and is made once it is gone."""
    assert toolkit(m1_db, "migrate", MILESTONE).exit_code == 0
    flag = tmp_path / "pause"
    flag.touch()
    log = tmp_path / "run.log"
    env = {**os.environ, "TOOLKIT_DATABASE_URL": m1_db.url_text}
    column = "SELECT count(*) FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass " \
             "AND attname = 'model_id'"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "toolkit", "migrate", "milestone-2",
                                    "--throttle-flag-file", str(flag)],
                                   env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(log, process, "waiting before add-model-id-column", "flag file")
        time.sleep(1.0)
        assert process.poll() is None and m1_db.scalar(column) == 0, log.read_text()
        flag.unlink()
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert m1_db.scalar(column) == 1


@contextmanager
def _archiving_server(tmp_path, archive_command: str) -> Iterator[sa.Engine]:
    """A server of the test's own with WAL archiving on, through ``archive_command`` (a
    shell line), and an autocommit engine on it."""
    from toolkit.sandbox.server import SandboxServer

    script = tmp_path / "archive.sh"
    script.write_text(f"#!/bin/sh\n{archive_command}\n")
    script.chmod(0o755)
    server = SandboxServer(tmp_path / "archiving", {"archive_mode": "on", "archive_command": str(script),
                                                     "fsync": "off"})
    try:
        status = server.start()
        engine = create_engine(parse_url(status.url("postgres")), isolation_level="AUTOCOMMIT")
        try:
            yield engine
        finally:
            engine.dispose()
    finally:
        server.destroy()


def test_wal_archiving_that_fails_after_the_start_is_a_reason_to_wait(tmp_path):
    """A server of its own whose archive_command fails: once a WAL segment fails to be
    archived after the run started, the run would wait; once archiving works again, not."""
    failing = tmp_path / "archive-fails"
    failing.touch()
    with _archiving_server(tmp_path, f"[ ! -e '{failing}' ]") as engine:
        configure()
        throttle = Throttle(engine, health.Limits(), Budget(RunOptions()))
        throttle.start()
        assert throttle.over(()) == []
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE written_since (x int)")
            conn.exec_driver_sql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 15
        while not (over := throttle.over(())):
            assert time.monotonic() < deadline, "archiving did not fail in 15 s"
            time.sleep(0.1)
        assert [r.signal for r in over] == ["archiving"]
        assert "WAL archiving is failing" in over[0].detail, over[0].detail
        failing.unlink()
        with engine.connect() as conn:  # a new segment wakes the archiver, which retries
            conn.exec_driver_sql("INSERT INTO written_since VALUES (1)")
            conn.exec_driver_sql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 30
        while throttle.over(()):
            assert time.monotonic() < deadline, "archiving did not recover in 30 s"
            time.sleep(0.2)


def test_wal_archiving_falling_behind_is_a_reason_to_wait(tmp_path):
    """An archiver that works but slowly (a second a segment): six segments made at once
    leave more waiting than at the start, over a limit of 2; once archived, no more."""
    with _archiving_server(tmp_path, "sleep 1") as engine:
        configure()
        throttle = Throttle(engine, health.Limits(max_archive_backlog=2), Budget(RunOptions()))
        throttle.start()
        assert throttle.over(()) == []
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE written_since (x int)")
            for n in range(6):
                conn.exec_driver_sql(f"INSERT INTO written_since VALUES ({n})")
                conn.exec_driver_sql("SELECT pg_switch_wal()")
        over = throttle.over(())
        assert [r.signal for r in over] == ["archiving"], over
        assert "WAL archiving is falling behind" in over[0].detail and "(limit 2)" in over[0].detail
        deadline = time.monotonic() + 30
        while throttle.over(()):
            assert time.monotonic() < deadline, "the archiver did not catch up in 30 s"
            time.sleep(0.2)
        archiving = next(r for r in health.readings_now(engine, ()) if r.signal == "archiving")
        assert "segments waiting" in archiving.detail and not archiving.over
