"""The proof tells the application's writes from the migration's (toolkit/verify/app_writes.py).

After milestone 2 and 3 took their baselines, MLflow clients go on writing through the
server: a run older than the baseline is finished (status, end_time), gets a tag, a metric
and a param, another is deleted, an experiment is deleted, one is created. Each write is
simulated as the server does it: the rows and ``stages.record_write`` in one transaction.
Verify passes and says how many runs the clients wrote; the same change without its
record fails; a change the migration makes to a run fails, even beside recorded writes.
"""

from __future__ import annotations

import pytest
from helpers import toolkit, toolkit_json

from toolkit.mlflow_api import stage_experiments, stages

ENDPOINT = "test"
CHECK = "the MLflow view equals the fingerprint taken before {}"


def _checks(doc: dict) -> dict[str, dict]:
    result = doc["result"] if "result" in doc else doc["error"]["details"]["result"]
    return {c["name"]: c for m in result["milestones"] for c in m["checks"]}


def verified(db, milestone: str) -> tuple[int, dict]:
    code, doc = toolkit_json(db, "verify", milestone)
    return code, _checks(doc)[CHECK.format(milestone)]


@pytest.fixture
def migrated(before_milestone):
    """Milestones 1-3 applied, milestone 2's and 3's baselines taken before them."""
    db = before_milestone(3)
    result = toolkit(db, "migrate", "milestone-3")
    assert result.exit_code == 0, result.output
    return db


def _runs(db) -> list[int]:
    """Runs older than the baselines, without a model version, ordered by id."""
    return [r.id for r in db.rows("SELECT id FROM ml_candidates WHERE model_version_id IS NULL ORDER BY id")]


def finish(conn, run: int, *, recorded: bool = True) -> None:
    """runs/update (set_terminated): status FINISHED, end_time."""
    conn.exec_driver_sql("UPDATE ml_candidates SET status = 2, end_time = 1700000000000, updated_at = now() "
                         f"WHERE id = {run}")
    if recorded:
        stages.record_write(conn, ENDPOINT, "ml_candidates", run, "update", candidate_id=run)


def log_to(conn, run: int) -> None:
    """runs/log-batch on an old run: a tag, a metric, a param (new rows, past the watermarks)."""
    for table, columns, values in (
        ("ml_candidate_metadata", "name, value", "'late tag', 'v'"),
        ("ml_candidate_metrics", "name, value, step, tracked_at", "'late metric', 1.5, 0, 1700000000"),
        ("ml_candidate_params", "name, value", "'late param', 'p'"),
    ):
        row = conn.exec_driver_sql(
            f"INSERT INTO {table} (created_at, updated_at, candidate_id, {columns}) "
            f"VALUES (now(), now(), {run}, {values}) RETURNING id").scalar_one()
        stages.record_write(conn, ENDPOINT, table, row, "insert", candidate_id=run)


def delete_run(conn, run: int) -> None:
    """runs/delete: the run and (ON DELETE CASCADE) its params, metrics and tags."""
    conn.exec_driver_sql(f"DELETE FROM ml_candidate_metadata WHERE candidate_id = {run}")
    conn.exec_driver_sql(f"DELETE FROM ml_candidates WHERE id = {run}")
    stages.record_write(conn, ENDPOINT, "ml_candidates", run, "delete", candidate_id=run)


def test_the_clients_writes_pass_and_are_reported(migrated):
    db = migrated
    runs = _runs(db)
    experiment = db.scalar("SELECT min(id) FROM ml_experiments WHERE deleted_on IS NULL")
    with db.engine.begin() as conn:
        finish(conn, runs[0])
        log_to(conn, runs[1])
        delete_run(conn, runs[2])
        conn.exec_driver_sql(f"UPDATE ml_experiments SET deleted_on = now() WHERE id = {experiment}")
        stages.record_write(conn, ENDPOINT, "ml_experiments", experiment, "update")
        stage_experiments.create_experiment(conn, stages.stage_of(conn),
                                 project_id=db.scalar("SELECT min(project_id) FROM ml_models"),
                                 name="made during the proof", tags=[("t", "v")], user_id=None, iid=9001)
    for milestone in ("milestone-2", "milestone-3"):
        code, check = verified(db, milestone)
        assert code == 0 and check["ok"], check
        assert "runs written by MLflow clients through toolkit mlflow serve since the baseline" in check["detail"]
    assert "runs differ only at" in verified(db, "milestone-2")[1]["detail"]
    _, check = verified(db, "milestone-3")
    assert "1 experiment" in check["detail"] and "experiments" in check["detail"]


def test_the_same_change_without_its_record_fails(migrated):
    db = migrated
    runs = _runs(db)
    with db.engine.begin() as conn:
        finish(conn, runs[0], recorded=False)
    code, check = verified(db, "milestone-3")
    assert code != 0 and not check["ok"]
    assert f"differs at run id {runs[0]}" in check["detail"] or "differs at runs ids" in check["detail"], check


def test_a_migration_change_beside_recorded_writes_still_fails(migrated):
    db = migrated
    runs = _runs(db)
    with db.engine.begin() as conn:
        finish(conn, runs[0])
    assert verified(db, "milestone-3")[0] == 0
    # what a migration bug would do: a run changed, recorded nowhere
    db.execute(f"UPDATE ml_candidates SET status = 3 WHERE id = {runs[-1]}")
    code, check = verified(db, "milestone-3")
    assert code != 0 and not check["ok"] and "mlflow.runs" in check["detail"], check


def test_a_write_before_the_baseline_does_not_excuse_a_later_change(migrated):
    db = migrated
    runs = _runs(db)
    with db.engine.begin() as conn:
        finish(conn, runs[0])
    assert toolkit(db, "fingerprint", "--baseline", "milestone-3").exit_code == 0
    db.execute(f"UPDATE ml_candidates SET status = 3 WHERE id = {runs[0]}")
    code, check = verified(db, "milestone-3")
    assert code != 0 and not check["ok"], check


def test_the_rollbacks_accept_the_clients_writes_and_nothing_else(migrated, make_database):
    db = migrated
    runs = _runs(db)
    with db.engine.begin() as conn:
        finish(conn, runs[0])
        delete_run(conn, runs[1])
    unrecorded = make_database(like=db)
    with unrecorded.engine.begin() as conn:
        finish(conn, runs[-1], recorded=False)
    for milestone in ("milestone-3", "milestone-2"):
        result = toolkit(db, "rollback", milestone)
        assert result.exit_code == 0, result.output
        assert "2 runs written by MLflow clients through toolkit mlflow serve since the baseline" in result.output
    result = toolkit(unrecorded, "rollback", "milestone-3")
    assert result.exit_code != 0 and "tables.ml_candidates" in result.output, result.output


def test_a_package_a_client_renamed_passes_milestone_1s_rollback(migrated, make_database):
    """model-versions/create with a run renames the run's package to the model's name and
    the version (registry_writes.py): milestone 1's rollback must give packages_packages
    back, and accepts that one, recorded; a package changed unrecorded fails the first
    rollback that compares its run."""
    db = migrated
    run, package = db.rows("SELECT id, package_id FROM ml_candidates WHERE package_id IS NOT NULL "
                           "ORDER BY id LIMIT 1")[0]
    with db.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE packages_packages SET name = 'renamed', version = '9.9.9' WHERE id = {package}")
        stages.record_write(conn, ENDPOINT, "packages_packages", package, "update", candidate_id=run)
    other = make_database(like=db)
    other.execute("UPDATE packages_packages SET version = '0.0.1' WHERE id = (SELECT max(package_id) "
                  "FROM ml_candidates)")
    for milestone in ("milestone-3", "milestone-2", "milestone-1"):
        result = toolkit(db, "rollback", milestone)
        assert result.exit_code == 0, result.output
    assert "packages_packages differ only at" in result.output, result.output
    result = toolkit(other, "rollback", "milestone-3")  # its run's artifact_uri names the package
    assert result.exit_code != 0 and "mlflow.run_artifact_uris" in result.output, result.output
