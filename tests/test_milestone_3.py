"""Milestone 3: adversarial slugs and metadata clashes, models GitLab uses or creates later,
a kill part-way, the gate. A model for every experiment as planned, rollback, resume and
a concurrent writer are the contract's (test_contract.py)."""

from __future__ import annotations

import signal

from helpers import toolkit, toolkit_json, toolkit_process

from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV
from toolkit.errors import ExitCode


def _step(doc: dict, name: str) -> dict:
    return next(s for s in doc["result"]["milestones"][0]["steps"] if s["step"] == name)


def test_adversarial_slugs_and_metadata_clashes(before_milestone):
    db = before_milestone(3)
    plan = _step(toolkit_json(db, "plan", "milestone-3")[1], "create-models-for-experiments")
    kinds = {a["kind"]: a for a in plan["anomalies"]}
    assert {r["slug"] for r in kinds["slug_collision"]["rows"]} >= {"my_experiment_2", "my_experiment_3"}
    assert all(r["slug"].startswith("experiment_") for r in kinds["slug_fallback"]["rows"])
    assert kinds["slug_fallback"]["count"] >= 5
    clash = kinds["metadata_clash"]["rows"]
    assert [(r["name"], r["experiment_value"], r["model_value"]) for r in clash] == [("owner", "alice", "bob")]

    assert toolkit(db, "migrate", "milestone-3").exit_code == 0
    model_id = clash[0]["model_id"]
    assert db.scalar("SELECT value FROM ml_model_metadata WHERE model_id = :m AND name = 'owner'", m=model_id) == "bob"
    assert db.rows("SELECT name, experiment_value, model_value FROM toolkit.m3_metadata_clashes") == [
        ("owner", "alice", "bob")]
    # a same-valued key is no clash, and a missing one was copied
    assert db.scalar("SELECT count(*) FROM ml_model_metadata WHERE model_id = :m AND name = 'license'", m=model_id) == 1
    models = dict(db.rows("SELECT e.name, m.name FROM ml_experiments e JOIN ml_models m ON m.id = e.model_id"))
    assert models["My Experiment"] == "my_experiment_2"
    assert models["Ünïcödé Straße"] == "unicode_strasse"
    assert len(models["Ü" * 254 + "🚀"]) <= 255
    assert models["Robert'); DROP TABLE ml_experiments; --"] == "robert_drop_table_ml_experiments"


def test_rollback_keeps_a_model_gitlab_has_used_since(before_milestone):
    db = before_milestone(3, "realistic")
    assert toolkit(db, "migrate", "milestone-3").exit_code == 0
    used = db.scalar("SELECT model_id FROM toolkit.m3_created_models ORDER BY model_id LIMIT 1")
    db.execute("""INSERT INTO ml_model_versions (created_at, updated_at, project_id, model_id, version)
                  SELECT now(), now(), project_id, id, '1.0.0' FROM ml_models WHERE id = :m""", m=used)
    result = toolkit(db, "rollback", "milestone-3")
    assert result.exit_code == ExitCode.VERIFY_FAILED
    assert "1 models kept" in result.output
    assert db.scalar("SELECT count(*) FROM ml_models WHERE id = :m", m=used) == 1
    assert db.scalar("SELECT model_id FROM ml_experiments WHERE model_id = :m", m=used) == used
    assert db.rows("SELECT model_id FROM toolkit.m3_created_models") == [(used,)]


def test_a_kill_part_way_leaves_part_of_the_models_created_and_recorded(before_milestone):
    """Where a kill leaves the run; that a re-run ends where an uninterrupted run does is
    the contract's (test_contract.py)."""
    killed = before_milestone(3)
    to_create = killed.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL")
    died = toolkit_process(killed, "migrate", "milestone-3", "--batch-size", "5",
                           env={FAULT_KILL_AFTER_BATCHES_ENV: "4"})
    assert died.returncode == -signal.SIGKILL
    assert 0 < killed.scalar("SELECT count(*) FROM toolkit.m3_created_models") < to_create


def test_models_gitlab_creates_after_milestone_3_get_a_display_name(before_milestone):
    db = before_milestone(3, "realistic")
    assert toolkit(db, "migrate", "milestone-3").exit_code == 0
    db.execute("INSERT INTO ml_models (created_at, updated_at, project_id, name) "
               "SELECT now(), now(), min(id), 'made-by-gitlab' FROM projects")
    assert db.scalar("SELECT display_name FROM ml_models WHERE name = 'made-by-gitlab'") == "made-by-gitlab"


def test_milestone_3_waits_for_milestone_2(realistic_db):
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    result = toolkit(realistic_db, "migrate", "milestone-3")
    assert result.exit_code == ExitCode.REFUSED and "milestone-2 does not verify" in result.output
