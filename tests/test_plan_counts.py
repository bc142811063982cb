"""Counts shown together add up: a plan of every milestone counts each row once (what
milestone 2 will change is not counted again in milestone 3), ``status`` gives a milestone
that is done no rows left while the next one runs, and its "schema changes left" is what
``migrate`` then reports."""

from __future__ import annotations

from helpers import toolkit, toolkit_json

from toolkit.milestones.m3_models_for_experiments import MILESTONE_2_SETS_FIRST


def _status(db) -> dict[str, dict]:
    code, doc = toolkit_json(db, "status")
    assert code == 0, doc
    return {m["milestone"]: m for m in doc["result"]["milestones"]}


def _schema_changes(doc: dict) -> int:
    return sum(1 for p in doc["result"]["passes"] if p["schema_change"] and p["changed"])


def test_a_plan_of_every_milestone_counts_what_each_migrate_then_changes(make_database):
    db = make_database("realistic:small")
    code, planned = toolkit_json(db, "plan")
    assert code == 0, planned
    rows = {m["milestone"]: m["rows"] for m in planned["result"]["milestones"]}
    for milestone in ("milestone-1", "milestone-2", "milestone-3"):
        code, applied = toolkit_json(db, "migrate", milestone)
        assert code == 0, applied
        assert applied["result"]["rows"] == rows[milestone], (milestone, applied["result"]["passes"])
    link = next(s for s in planned["result"]["milestones"][2]["steps"] if s["step"] == "link-candidates")
    # the candidates milestone 2 sets are said, not counted again
    assert link["context"][MILESTONE_2_SETS_FIRST] > 0, link
    summary = planned["result"]["summary"]
    assert summary["rows"] == sum(rows.values()), summary


def test_status_while_milestone_3_runs_leaves_milestone_2_nothing(before_milestone):
    db = before_milestone(3, "realistic")
    assert sum(_status(db)["milestone-2"]["remaining"].values()) == 0
    # the display-name backfill and the model creation, then a stop before the candidates
    code, doc = toolkit_json(db, "migrate", "milestone-3", "--batch-size", "50000", "--max-batches", "2")
    assert code == 0 and doc["result"]["stopped"] == "max-batches", doc
    assert [p["name"] for p in doc["result"]["passes"]][-1] == "create-models-for-experiments"
    waiting = db.scalar("""SELECT count(*) FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id
                           WHERE c.model_id IS NULL AND e.model_id IS NOT NULL""")
    assert waiting > 0
    status = _status(db)
    assert status["milestone-2"]["state"] == "verified"
    assert status["milestone-2"]["remaining"] == {"backfill-model-id": 0}, status["milestone-2"]
    assert status["milestone-3"]["remaining"]["link-candidates"] == waiting
    line = next(x for x in toolkit(db, "status").output.splitlines() if x.startswith("milestone-2"))
    assert line.split()[1:3] == ["verified", "0"], line


def test_status_counts_the_schema_changes_migrate_reports(before_milestone):
    db = before_milestone(4, "realistic")
    left = {name: m["schema_changes_left"] for name, m in _status(db).items()}
    assert left["milestone-1"] == left["milestone-2"] == left["milestone-3"] == 0
    code, doc = toolkit_json(db, "migrate", "milestone-4", "--yes")
    assert code == 0, doc
    assert left["milestone-4"] == _schema_changes(doc) > 3
    assert _status(db)["milestone-4"]["schema_changes_left"] == 0


def test_plan_closes_with_a_summary_and_no_sql_leaves_out_only_the_sql(make_database):
    db = make_database("adversarial:small")
    code, doc = toolkit_json(db, "plan")
    assert code == 0
    summary = doc["result"]["summary"]
    blocking = sum(a["count"] for m in doc["result"]["milestones"] for s in m["steps"]
                   for a in s["anomalies"] if a["blocking"])
    assert summary["blocking"] == blocking > 0
    assert [m["rows"] for m in summary["milestones"]] == [m["rows"] for m in doc["result"]["milestones"]]
    full, short = toolkit(db, "plan"), toolkit(db, "plan", "--no-sql")
    assert full.exit_code == short.exit_code == 0
    assert "UPDATE packages_packages" in full.output and "UPDATE packages_packages" not in short.output
    tail = short.output[short.output.index("Summary ("):].splitlines()
    assert tail[1].split() == ["milestone", "rows", "BLOCKING", "warnings", "gate"]
    m1 = summary["milestones"][0]
    assert tail[3].split()[:4] == ["milestone-1", str(m1["rows"]), str(m1["blocking"]), str(m1["warnings"])]
    assert tail[-1].split()[:3] == ["total", str(summary["rows"]), str(blocking)]


def test_fail_on_blocking_exits_1_when_a_blocking_anomaly_is_found(make_database):
    blocked = make_database("adversarial:small")
    result = toolkit(blocked, "plan", "milestone-1", "--no-sql", "--fail-on-blocking")
    assert result.exit_code == 1, result.output
    assert "Summary (" in result.output
    assert "error: BLOCKING anomalies found (milestone-1 " in result.output
    code, doc = toolkit_json(blocked, "plan", "--fail-on-blocking")
    assert code == doc["exit_code"] == 1 and doc["error"]["details"]["result"]["summary"]["blocking"] > 0
    clean = make_database("realistic:small")
    code, doc = toolkit_json(clean, "plan", "--fail-on-blocking")
    assert code == 0 and doc["result"]["summary"]["blocking"] == 0, doc["result"]["summary"]
