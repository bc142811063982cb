"""Milestone 1: unresolved anomalies, rollback after a kill, packages the application adds,
a colliding insert, the SQL shown. Counts, idempotence, rollback, resume and a concurrent
writer on realistic and resolved adversarial data are the contract's (test_contract.py)."""

from __future__ import annotations

import signal
import threading
import time

import sqlalchemy as sa
from helpers import snapshot, toolkit, toolkit_json, toolkit_process

from toolkit import milestones as registry
from toolkit.cli.sql import positional
from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV
from toolkit.engine.runner import Runner
from toolkit.engine.settings import RunOptions
from toolkit.errors import ExitCode
from toolkit.milestones.m1_packages import CONVERT_BATCH, RESTORE_BATCH
from toolkit.output import out

GITLAB_TABLES = ("packages_packages", "packages_package_files", "ml_candidates", "ml_experiments",
                 "ml_models", "ml_model_versions", "ml_candidate_params", "ml_candidate_metrics")
ALL_PACKAGES = "SELECT * FROM packages_packages ORDER BY id"


def _plan(db) -> dict:
    code, doc = toolkit_json(db, "plan", "milestone-1")
    assert code == 0
    return doc["result"]["milestones"][0]["steps"][0]


def _anomaly_ids(step: dict, kind: str) -> list[int]:
    return [r["package_id"] for a in step["anomalies"] if a["kind"] == kind for r in a["rows"]]


def test_with_blocking_anomalies_left_the_counts_hold_verify_fails_and_rollback_gives_all_back(adversarial_db):
    """Adversarial data as generated, its blocking anomalies unresolved (the contract,
    test_contract.py, runs milestone 1 on realistic data and on adversarial data resolved)."""
    db = adversarial_db
    rows_before, digests_before = db.rows(ALL_PACKAGES), snapshot(db, GITLAB_TABLES)
    step = _plan(db)
    assert step["rows"] > 0 and sum(step["breakdown"].values()) == step["rows"]
    generic_before = db.scalar("SELECT count(*) FROM packages_packages WHERE package_type = 7")

    code, doc = toolkit_json(db, "migrate", "milestone-1", "--batch-size", "25")
    assert code == ExitCode.VERIFY_FAILED
    applied = doc["error"]["details"]["result"]["rows"]
    assert applied == step["rows"]
    assert db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == step["rows"]
    assert db.scalar("SELECT count(*) FROM packages_packages WHERE package_type = 7") == generic_before - applied
    again = toolkit_json(db, "migrate", "milestone-1")[1]
    assert again["error"]["details"]["result"]["rows"] == 0
    assert _plan(db)["rows"] == 0

    assert db.rows(ALL_PACKAGES) != rows_before
    result = toolkit(db, "rollback", "milestone-1", "--batch-size", "7")
    assert result.exit_code == 0, result.output
    assert db.rows(ALL_PACKAGES) == rows_before
    assert snapshot(db, GITLAB_TABLES) == digests_before
    assert db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == 0
    assert db.scalar("SELECT count(*) FROM toolkit.checkpoints") == 0
    assert toolkit_json(db, "status")[1]["result"]["milestones"][0]["state"] == "rolled_back"


def test_rollback_after_a_kill_restores_exactly_what_was_converted(realistic_db):
    rows_before = realistic_db.rows(ALL_PACKAGES)
    died = toolkit_process(realistic_db, "migrate", "milestone-1", "--batch-size", "5",
                           env={FAULT_KILL_AFTER_BATCHES_ENV: "4"})
    assert died.returncode == -signal.SIGKILL
    partial = realistic_db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages")
    assert 0 < partial < _plan_rows_before(rows_before)
    assert toolkit(realistic_db, "rollback", "milestone-1").exit_code == 0
    assert realistic_db.rows(ALL_PACKAGES) == rows_before
    # and a later migrate starts from the beginning, not from the dead run's checkpoint
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    assert realistic_db.scalar("SELECT count(*) FROM packages_packages p WHERE package_type = 7 "
                               "AND id IN (SELECT package_id FROM ml_candidates)") == 0


def _plan_rows_before(rows: list) -> int:
    return sum(1 for r in rows if r.package_type == 7)


def test_anomalies_are_reported_and_left_untouched_warnings_are_converted(adversarial_db):
    db = adversarial_db
    step = _plan(db)
    blocking = {a["kind"]: a for a in step["anomalies"] if a["blocking"]}
    assert {k for k, a in blocking.items() if a["count"]} == {
        "cross_project_package", "ml_model_collision", "status_message_too_long"}
    blocked_ids = [r["package_id"] for a in blocking.values() for r in a["rows"]]
    warned = {a["kind"]: a for a in step["anomalies"] if not a["blocking"]}
    assert warned["shared_package"]["count"] == 1
    assert len(warned["shared_package"]["rows"][0]["candidate_ids"]) == 2
    rejected = {r["version"] for r in warned["version_rejected_by_ml_model_rule"]["rows"]}
    assert "-" in rejected and None in rejected and "1.2.3" not in rejected
    assert all(v is None or not v.startswith("candidate_") for v in rejected)
    before = db.rows("SELECT * FROM packages_packages WHERE id = ANY(:ids) ORDER BY id", ids=blocked_ids)

    result = toolkit(db, "migrate", "milestone-1")
    assert result.exit_code == ExitCode.VERIFY_FAILED
    assert db.rows("SELECT * FROM packages_packages WHERE id = ANY(:ids) ORDER BY id", ids=blocked_ids) == before
    for kind in blocking:
        assert kind in result.output
    warned_ids = _anomaly_ids(step, "shared_package") + _anomaly_ids(step, "version_rejected_by_ml_model_rule")
    assert db.scalar("SELECT bool_and(package_type = 14) FROM packages_packages WHERE id = ANY(:ids)",
                     ids=warned_ids)
    verify = toolkit_json(db, "verify", "milestone-1")[1]["error"]["details"]["result"]["milestones"][0]
    remaining = verify["checks"][0]["rows"]
    assert sorted(r["package_id"] for r in remaining) == sorted(blocked_ids)
    assert "status_message_too_long" in verify["checks"][0]["remedy"]


def test_only_candidate_generic_packages_change(adversarial_db):
    db = adversarial_db
    untouched_sql = """SELECT * FROM packages_packages WHERE package_type <> 7
                       OR id NOT IN (SELECT package_id FROM ml_candidates WHERE package_id IS NOT NULL)
                       ORDER BY id"""
    untouched = db.rows(untouched_sql)
    assert any(r.package_type == 7 for r in untouched)  # generic packages no candidate uses
    toolkit(db, "migrate", "milestone-1")
    toolkit(db, "rollback", "milestone-1")
    assert db.rows(untouched_sql) == untouched


def test_candidates_the_application_adds_later_are_caught_by_verify_and_a_rerun(realistic_db):
    db = realistic_db
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    db.execute("""
        WITH pkg AS (
            INSERT INTO packages_packages (project_id, created_at, updated_at, name, version, package_type)
            SELECT e.project_id, now(), now(), 'ml_experiment_' || e.iid, '9999', 7
            FROM ml_experiments e WHERE e.model_id IS NULL ORDER BY e.id LIMIT 1
            RETURNING id, project_id)
        INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid, project_id, package_id, internal_id)
        SELECT now(), now(), e.id, gen_random_uuid(), pkg.project_id, pkg.id, 9999
        FROM pkg JOIN ml_experiments e ON e.project_id = pkg.project_id AND e.model_id IS NULL
        ORDER BY e.id LIMIT 1""")
    verify = toolkit(db, "verify", "milestone-1")
    assert verify.exit_code == ExitCode.VERIFY_FAILED
    assert "1 not_yet_converted" in verify.output
    code, doc = toolkit_json(db, "migrate", "milestone-1")
    assert code == 0 and doc["result"]["rows"] == 1
    assert toolkit(db, "verify", "milestone-1").exit_code == 0


def test_a_colliding_insert_by_another_session_never_aborts_the_run(realistic_db, capsys):
    db = realistic_db
    victim = db.rows("""SELECT p.id, p.project_id, p.name, p.version FROM packages_packages p
                        JOIN ml_candidates c ON c.package_id = p.id
                        WHERE p.package_type = 7 AND p.status = 0 ORDER BY c.id DESC LIMIT 1""")[0]
    app_session = db.engine.connect()
    app_session.execute(sa.text("""
        INSERT INTO packages_packages (project_id, created_at, updated_at, name, version, package_type)
        VALUES (:p, now(), now(), :n, :v, 14)"""), {"p": victim.project_id, "n": victim.name, "v": victim.version})
    outcome: dict = {}

    def migrate() -> None:
        runner = Runner(db.engine, RunOptions(batch_size=50, lock_timeout_ms=3000, backoff_s=0.05),
                        plan=registry.plan(), events=out)
        try:
            outcome["result"] = runner.migrate(registry.get("milestone-1"))
        except Exception as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=migrate)
    thread.start()
    time.sleep(1.0)  # the run reaches the victim's batch and waits on the uncommitted twin
    app_session.commit()
    app_session.close()
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.complete
    # the race really happened: the batch hit the unique index, was rolled back and retried
    assert "unique violation" in capsys.readouterr().err
    assert db.scalar("SELECT package_type FROM packages_packages WHERE id = :id", id=victim.id) == 7
    assert not result.verify.ok
    assert result.verify.checks[0].rows == [{"package_id": victim.id, "reason": "ml_model_collision"}]


def test_sql_shows_the_statements_the_engine_runs(realistic_db):
    printed = toolkit(realistic_db, "sql", "milestone-1").output
    assert positional(CONVERT_BATCH.strip()) in printed  # the same statement, binds numbered
    assert "lock_timeout" in printed
    planned = _plan(realistic_db)["sql"]
    # the statement the engine runs, then the read-only count of runs whose artifact_uri changes
    assert planned[0] == CONVERT_BATCH.strip() and len(planned) == 2
    assert planned[1].startswith("-- runs whose MLflow artifact_uri changes") and "UPDATE" not in planned[1]
    back = toolkit(realistic_db, "sql", "milestone-1", "--rollback").output
    assert "UPDATE packages_packages p SET package_type = l.previous_package_type" in back
    assert positional(RESTORE_BATCH.strip()) in back
