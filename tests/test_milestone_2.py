"""Milestone 2: an interrupted index build, the checkpoint a kill leaves, the plan on an
untouched database, the candidate report. The backfill as planned, the trigger, rollback,
resume and a concurrent writer are the contract's (test_contract.py)."""

from __future__ import annotations

import signal
import threading
import time

import sqlalchemy as sa
from helpers import toolkit, toolkit_json, toolkit_process

from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV
from toolkit.errors import ExitCode
from toolkit.schema import migrations


def test_an_interrupted_concurrent_index_build_is_detected_and_rebuilt(before_milestone):
    db = before_milestone(2, "realistic")
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


def test_verify_names_an_invalid_index(before_milestone):
    db = before_milestone(2, "realistic")
    assert toolkit(db, "migrate", "milestone-2").exit_code == 0
    db.execute("UPDATE pg_index SET indisvalid = false "
               "WHERE indexrelid = 'index_ml_candidates_on_model_id'::regclass")
    result = toolkit(db, "verify", "milestone-2")
    assert result.exit_code == ExitCode.VERIFY_FAILED
    assert "INVALID (an interrupted build)" in result.output


def test_a_killed_backfill_keeps_the_last_key_of_its_last_committed_batch(before_milestone):
    """Where a kill leaves the backfill; that a re-run ends where an uninterrupted run does
    is the contract's (test_contract.py)."""
    killed = before_milestone(2, "realistic")
    # batches walk the candidates of default experiments, 5 at a time
    walked = [r[0] for r in killed.rows("""SELECT c.id FROM ml_candidates c JOIN ml_experiments e
                                           ON e.id = c.experiment_id WHERE e.model_id IS NOT NULL ORDER BY c.id""")]
    died = toolkit_process(killed, "migrate", "milestone-2", "--batch-size", "5",
                           env={FAULT_KILL_AFTER_BATCHES_ENV: "3"})
    assert died.returncode == -signal.SIGKILL
    assert killed.scalar("SELECT last_key FROM toolkit.checkpoints WHERE step = 'backfill-model-id'") == walked[14]


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


def test_candidate_report_reads_params_and_latest_metrics_through_model_id(before_milestone):
    db = before_milestone(2, "realistic")
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
