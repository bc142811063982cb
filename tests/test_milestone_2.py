"""Milestone 2: model_id column, index, foreign key, trigger, backfill, report."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import sqlalchemy as sa
from helpers import (
    resolve_m1_anomalies,
    schema_snapshot,
    snapshot,
    toolkit,
    toolkit_json,
    toolkit_process,
)

from toolkit import milestones as registry
from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV, RunOptions
from toolkit.engine.runner import Runner
from toolkit.errors import ExitCode
from toolkit.schema import migrations

EXPECTED_MODEL_ID = """SELECT c.id, e.model_id FROM ml_candidates c
                       JOIN ml_experiments e ON e.id = c.experiment_id ORDER BY c.id"""


def ready_for_m2(db, profile: str) -> None:
    if profile == "adversarial":
        resolve_m1_anomalies(db)
    result = toolkit(db, "migrate", "milestone-1")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("profile", ["realistic", "adversarial"])
def test_backfill_sets_every_candidates_model_from_its_experiment(make_database, profile):
    db = make_database(f"{profile}:small")
    ready_for_m2(db, profile)
    expected = db.rows(EXPECTED_MODEL_ID)
    plan = toolkit_json(db, "plan", "milestone-2")[1]["result"]["milestones"][0]
    backfill = next(s for s in plan["steps"] if s["step"] == "backfill-model-id")
    with_model = sum(1 for _, model_id in expected if model_id is not None)
    assert backfill["rows"] == with_model > 0
    code, doc = toolkit_json(db, "migrate", "milestone-2", "--batch-size", "40")
    assert code == 0, doc
    assert next(p for p in doc["result"]["passes"] if p["name"] == "backfill-model-id")["rows"] == with_model
    assert db.rows("SELECT id, model_id FROM ml_candidates ORDER BY id") == expected
    assert toolkit(db, "verify", "milestone-2").exit_code == 0
    assert toolkit_json(db, "migrate", "milestone-2")[1]["result"]["rows"] == 0


def test_candidates_written_during_and_after_the_run_get_model_id(realistic_db):
    db = realistic_db
    ready_for_m2(db, "realistic")
    default_experiment = db.scalar("SELECT id FROM ml_experiments WHERE model_id IS NOT NULL ORDER BY id LIMIT 1")
    stop = threading.Event()
    writing = threading.Event()
    latencies: list[tuple[float, float]] = []  # (finished at, seconds taken)
    errors: list[Exception] = []

    def application() -> None:
        engine = sa.create_engine(db.engine.url)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(sa.text("""
                        INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid, project_id)
                        SELECT now(), now(), e.id, gen_random_uuid(), e.project_id
                        FROM ml_experiments e WHERE e.id = :e"""), {"e": default_experiment})
                finished = time.perf_counter()
                latencies.append((finished, finished - started))
                writing.set()
                time.sleep(0.02)
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            engine.dispose()

    writer = threading.Thread(target=application)
    writer.start()
    try:
        assert writing.wait(30), errors
        run_started = time.perf_counter()
        runner = Runner(db.engine, RunOptions(batch_size=10, pause_ms=30), plan=registry.plan())
        result = runner.migrate(registry.get("milestone-2"))
        run_finished = time.perf_counter()
    finally:
        stop.set()
        writer.join(30)
    assert not errors
    assert result.complete and result.verify.ok, [c.as_dict() for c in result.verify.checks if not c.ok]
    # the writer was inserting throughout the run, not only before or after it
    during = [took for finished, took in latencies if run_started < finished <= run_finished]
    assert len(during) >= 5, (len(during), run_finished - run_started)
    taken = [took for _, took in latencies]
    # Inserts are never queued behind the backfill: row-level locks on other rows do not
    # conflict with an INSERT, and each DDL lock is held for milliseconds.
    assert max(taken) < 1.0, max(taken)
    db.execute("""INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid, project_id)
                  SELECT now(), now(), id, gen_random_uuid(), project_id FROM ml_experiments WHERE id = :e""",
               e=default_experiment)
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE experiment_id = :e AND model_id IS NULL",
                     e=default_experiment) == 0
    # moving a candidate to another experiment follows that experiment's model
    plain = db.scalar("SELECT id FROM ml_experiments WHERE model_id IS NULL ORDER BY id LIMIT 1")
    moved = db.scalar("SELECT max(id) FROM ml_candidates WHERE experiment_id = :e", e=default_experiment)
    db.execute("UPDATE ml_candidates SET experiment_id = :p WHERE id = :c", p=plain, c=moved)
    assert db.scalar("SELECT model_id FROM ml_candidates WHERE id = :c", c=moved) is None
    assert toolkit(db, "verify", "milestone-2").exit_code == 0


def test_an_interrupted_concurrent_index_build_is_detected_and_rebuilt(realistic_db):
    db = realistic_db
    ready_for_m2(db, "realistic")
    with db.engine.connect() as conn:
        migrations.upgrade(conn, "m2_0001")
    # A transaction holding ROW EXCLUSIVE on the table (an uncommitted UPDATE, rolled back
    # later) makes CREATE INDEX CONCURRENTLY wait after it has created the index entry;
    # cancelling it then leaves the index INVALID, as an interrupted build in production does.
    old = db.engine.connect()
    old.execute(sa.text("UPDATE ml_candidates SET updated_at = updated_at "
                        "WHERE id = (SELECT min(id) FROM ml_candidates)"))
    builder = db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    builder_pid = builder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    failure: list[Exception] = []

    def build() -> None:
        try:
            builder.execute(sa.text("CREATE INDEX CONCURRENTLY index_ml_candidates_on_model_id "
                                    "ON ml_candidates USING btree (model_id)"))
        except Exception as exc:
            failure.append(exc)

    thread = threading.Thread(target=build)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not db.scalar(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p", p=builder_pid):
        time.sleep(0.05)
    db.scalar("SELECT pg_cancel_backend(:p)", p=builder_pid)
    thread.join(20)
    old.rollback()
    old.close()
    builder.close()
    assert failure and "canceling statement" in str(failure[0])
    assert db.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                     "'index_ml_candidates_on_model_id'::regclass") is False

    result = toolkit(db, "migrate", "milestone-2")
    assert result.exit_code == 0, result.output
    assert db.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                     "'index_ml_candidates_on_model_id'::regclass") is True
    assert "index_ml_candidates_on_model_id is valid: valid" in toolkit(db, "verify", "milestone-2").output


def test_verify_names_an_invalid_index(realistic_db):
    db = realistic_db
    ready_for_m2(db, "realistic")
    assert toolkit(db, "migrate", "milestone-2").exit_code == 0
    db.execute("UPDATE pg_index SET indisvalid = false "
               "WHERE indexrelid = 'index_ml_candidates_on_model_id'::regclass")
    result = toolkit(db, "verify", "milestone-2")
    assert result.exit_code == ExitCode.VERIFY_FAILED
    assert "INVALID (an interrupted build)" in result.output


@pytest.mark.parametrize("profile", ["realistic", "adversarial"])
def test_rollback_gives_back_the_schema_and_the_data(make_database, profile):
    db = make_database(f"{profile}:small")
    ready_for_m2(db, profile)
    schema_before, data_before = schema_snapshot(db), snapshot(db)
    assert toolkit(db, "migrate", "milestone-2").exit_code == 0
    assert schema_snapshot(db) != schema_before
    result = toolkit(db, "rollback", "milestone-2")
    assert result.exit_code == 0, result.output
    assert schema_snapshot(db) == schema_before
    assert snapshot(db) == data_before
    assert toolkit(db, "migrate", "milestone-2").exit_code == 0  # and it applies again


def test_killed_backfill_resumes_to_the_same_end_state(make_database):
    killed, clean = make_database("realistic:small"), make_database("realistic:small")
    for db in (killed, clean):
        ready_for_m2(db, "realistic")
    # batches walk the candidates of default experiments, 5 at a time
    walked = [r[0] for r in killed.rows("""SELECT c.id FROM ml_candidates c JOIN ml_experiments e
                                           ON e.id = c.experiment_id WHERE e.model_id IS NOT NULL ORDER BY c.id""")]
    died = toolkit_process(killed, "migrate", "milestone-2", "--batch-size", "5",
                           env={FAULT_KILL_AFTER_BATCHES_ENV: "3"})
    assert died.returncode == -signal.SIGKILL
    assert killed.scalar("SELECT last_key FROM toolkit.checkpoints WHERE step = 'backfill-model-id'") == walked[14]
    assert toolkit_process(killed, "migrate", "milestone-2", "--batch-size", "5").returncode == 0
    assert toolkit_process(clean, "migrate", "milestone-2", "--batch-size", "5").returncode == 0
    assert snapshot(killed) == snapshot(clean)
    assert schema_snapshot(killed) == schema_snapshot(clean)


def test_plan_on_an_untouched_database_counts_the_backfill(realistic_db):
    code, doc = toolkit_json(realistic_db, "plan", "milestone-2")
    assert code == 0
    steps = {s["step"]: s for s in doc["result"]["milestones"][0]["steps"]}
    assert steps["backfill-model-id"]["rows"] == realistic_db.scalar(
        "SELECT count(*) FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id "
        "WHERE e.model_id IS NOT NULL")
    assert steps["add-model-id-column"]["kind"] == "schema"
    assert "ADD COLUMN IF NOT EXISTS model_id bigint" in steps["add-model-id-column"]["sql"][0]
    assert doc["result"]["milestones"][0]["gate"]["ok"] is False  # milestone 1 not applied yet


def test_candidate_report_reads_params_and_latest_metrics_through_model_id(realistic_db):
    db = realistic_db
    ready_for_m2(db, "realistic")
    assert toolkit(db, "migrate", "milestone-2").exit_code == 0
    project_id, model_id, name = db.rows("""
        SELECT m.project_id, m.id, m.name FROM ml_models m
        WHERE (SELECT count(*) FROM ml_candidates c WHERE c.model_id = m.id) > 3 ORDER BY m.id LIMIT 1""")[0]
    db.execute("""INSERT INTO ml_candidate_metrics (created_at, updated_at, candidate_id, name, value, step)
                  SELECT now(), now(), id, 'loss', -1, 999 FROM ml_candidates
                  WHERE model_id = :m ORDER BY id LIMIT 1""", m=model_id)
    code, doc = toolkit_json(db, "report", "candidates", "--project", str(project_id), "--model", name,
                             "--metric", "loss", "--order", "asc")
    assert code == 0
    candidates = doc["result"]["candidates"]
    assert len(candidates) == db.scalar("SELECT count(*) FROM ml_candidates WHERE model_id = :m", m=model_id)
    assert candidates[0]["metrics"]["loss"] == -1  # the latest row wins, and sorts first ascending
    losses = [c["metrics"]["loss"] for c in candidates if "loss" in c["metrics"]]
    assert losses == sorted(losses)
    first = candidates[0]
    assert first["params"] == dict(db.rows("SELECT name, value FROM ml_candidate_params WHERE candidate_id = :c",
                                           c=first["id"]))
    desc = toolkit_json(db, "report", "candidates", "--project", str(project_id), "--model", name,
                        "--metric", "loss")[1]["result"]["candidates"]
    assert [c["metrics"]["loss"] for c in desc if "loss" in c["metrics"]] == sorted(losses, reverse=True)
    missing = toolkit(db, "report", "candidates", "--project", str(project_id), "--model", "no-such-model")
    assert missing.exit_code == ExitCode.REFUSED and "No model named" in missing.output
