"""The proof reads only what a milestone can change: a table its runs never wrote (as
PostgreSQL counted inside each of their transactions) is not read again, and a wrong step
is still caught, in a table the milestone never writes and in one it does."""

from __future__ import annotations

import pytest
from helpers import OnePassStep, toolkit, toolkit_json

from toolkit import milestones as registry
from toolkit.engine.plan import Milestone
from toolkit.errors import ExitCode
from toolkit.milestones.m1_packages import MILESTONE_1

FIRST_BATCH = ":lo = 0"  # the wrong write happens once, in the pass's first batch
WRONG_WRITES = {
    "update": """UPDATE ml_candidate_metrics SET value = value + 1
                 WHERE id = (SELECT min(id) FROM ml_candidate_metrics)""",
    "insert": """INSERT INTO ml_candidate_params (candidate_id, name, value, project_id, created_at, updated_at)
                 SELECT id, 'stray', 'x', project_id, now(), now() FROM ml_candidates ORDER BY id LIMIT 1""",
    "delete": """DELETE FROM ml_candidate_metadata
                 WHERE id = (SELECT min(id) FROM ml_candidate_metadata)""",
}
WRONG_TABLE = {"update": "ml_candidate_metrics", "insert": "ml_candidate_params",
               "delete": "ml_candidate_metadata"}
WRONG_PARTS = {"update": "run_metrics_history", "insert": "run_params", "delete": "run_tags"}
# A package no candidate links to: milestone 1 writes packages_packages, but never this row.
UNLINKED_PACKAGE = """UPDATE packages_packages SET name = name || '-x' WHERE id = (
    SELECT min(id) FROM packages_packages p
    WHERE NOT EXISTS (SELECT 1 FROM ml_candidates c WHERE c.package_id = p.id))"""


def _once(write: str) -> str:
    return f"WITH w AS ({write} RETURNING 1) SELECT count(*) FROM w WHERE {FIRST_BATCH}"


def _milestone_1_with(monkeypatch, wrong_sql: str) -> None:
    """Milestone 1 as it is, plus a step that writes where it must not."""
    wrong = OnePassStep("wrong-step", "packages_packages", _once(wrong_sql))
    m1 = Milestone(name="milestone-1", title="milestone 1 and a wrong step",
                   steps=(*MILESTONE_1.steps, wrong), reads=MILESTONE_1.reads,
                   updates=MILESTONE_1.updates, may_change=MILESTONE_1.may_change)
    monkeypatch.setitem(registry.MILESTONES, "milestone-1", m1)


def _checks(db, milestone: str = "milestone-1") -> tuple[int, dict]:
    code, doc = toolkit_json(db, "verify", milestone)
    result = doc["result"] if code == 0 else doc["error"]["details"]["result"]
    return code, {c["name"]: c for c in result["milestones"][0]["checks"]}


def test_the_run_records_what_it_wrote_and_verify_reads_nothing_else(realistic_db):
    db = realistic_db
    code, doc = toolkit_json(db, "migrate", "milestone-1")
    assert code == 0, doc
    converted = doc["result"]["rows"]
    assert converted > 0
    written = db.rows("SELECT table_name, inserted, updated, deleted FROM toolkit.run_writes")
    assert [(r.table_name, r.inserted, r.updated, r.deleted) for r in written] == \
        [("packages_packages", 0, converted, 0)]
    assert db.scalar("SELECT bool_and(writes_tracked) FROM toolkit.runs WHERE milestone = 'milestone-1'")
    baseline = db.scalar("SELECT body FROM toolkit.fingerprints WHERE milestone = 'milestone-1'")
    # the one MLflow part made from packages: GitLab's artifact_uri of each run
    assert set(baseline["tables"]) == {"packages_packages"} and set(baseline["mlflow"]) == {"run_artifact_uris"}
    # and of that part only the runs with a package: the others' URIs come from tables it never writes
    assert baseline["scope"]["part_rows"] == {"run_artifact_uris": "c.package_id IS NOT NULL"}
    with_package = db.scalar("SELECT count(*) FROM ml_candidates WHERE package_id IS NOT NULL")
    assert 0 < baseline["mlflow"]["run_artifact_uris"]["rows"] == with_package \
        < db.scalar("SELECT count(*) FROM ml_candidates")
    code, checks = _checks(db)
    assert code == 0
    mlflow = checks["the MLflow view equals the fingerprint taken before milestone-1"]
    assert mlflow["ok"] and "run_metrics_history" in mlflow["detail"] and "not read again" in mlflow["detail"]
    assert "changed on purpose: packages_packages" in checks["every other ML table is unchanged"]["detail"]


@pytest.mark.parametrize("kind", sorted(WRONG_WRITES))
def test_a_wrong_step_in_a_table_the_milestone_never_writes_is_caught(realistic_db, monkeypatch, kind):
    db = realistic_db
    _milestone_1_with(monkeypatch, WRONG_WRITES[kind])
    result = toolkit(db, "migrate", "milestone-1")
    assert result.exit_code == ExitCode.VERIFY_FAILED, result.output
    stray = f"wrote to tables it must not change: {WRONG_TABLE[kind]} (1 row)"
    assert stray in result.output
    code, checks = _checks(db)
    assert code == ExitCode.VERIFY_FAILED
    mlflow = checks["the MLflow view equals the fingerprint taken before milestone-1"]
    assert not mlflow["ok"] and WRONG_PARTS[kind] in mlflow["detail"]
    assert not checks["every other ML table is unchanged"]["ok"]


def test_a_wrong_step_in_a_table_the_milestone_writes_is_caught(realistic_db, monkeypatch):
    db = realistic_db
    _milestone_1_with(monkeypatch, UNLINKED_PACKAGE)
    result = toolkit(db, "migrate", "milestone-1")
    assert result.exit_code == ExitCode.VERIFY_FAILED, result.output
    assert "tables.packages_packages (rows it may not change)" in result.output
    _, checks = _checks(db)
    assert not checks["every other ML table is unchanged"]["ok"]
    assert checks["the MLflow view equals the fingerprint taken before milestone-1"]["ok"]


def test_a_rollback_proves_untouched_tables_the_same_way(realistic_db):
    db = realistic_db
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    code, doc = toolkit_json(db, "rollback", "milestone-1")
    assert code == 0, doc
    back = {c["name"]: c for c in doc["result"]["checks"]}
    assert back["every ML table is as it was"]["ok"]
    assert "not read again: no run of milestone-1 wrote to them" in back["every ML table is as it was"]["detail"]
    undo = db.rows("""SELECT w.table_name, w.updated FROM toolkit.run_writes w
                      JOIN toolkit.runs r ON r.id = w.run_id WHERE r.command LIKE '%rollback%'""")
    assert [r.table_name for r in undo] == ["packages_packages"] and undo[0].updated > 0
