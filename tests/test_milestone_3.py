"""Milestone 3: a model for every experiment, slugs as planned, metadata, rollback, concurrency."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import sqlalchemy as sa
from helpers import resolve_m1_anomalies, schema_snapshot, snapshot, toolkit, toolkit_json, toolkit_process

from toolkit import milestones as registry
from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV, RunOptions
from toolkit.engine.runner import Runner
from toolkit.errors import ExitCode
from toolkit.milestones import slug

M3_TABLES = ("ml_models", "ml_experiments", "ml_candidates", "ml_model_metadata", "ml_experiment_metadata")


def ready_for_m3(db, profile: str) -> None:
    if profile == "adversarial":
        resolve_m1_anomalies(db)
    for milestone in ("milestone-1", "milestone-2"):
        result = toolkit(db, "migrate", milestone)
        assert result.exit_code == 0, result.output


def _step(doc: dict, name: str) -> dict:
    return next(s for s in doc["result"]["milestones"][0]["steps"] if s["step"] == name)


@pytest.mark.parametrize("profile", ["realistic", "adversarial"])
def test_every_experiment_gets_the_model_the_dry_run_announced(make_database, profile):
    db = make_database(f"{profile}:small")
    ready_for_m3(db, profile)
    names_before = db.rows("SELECT id, name FROM ml_experiments ORDER BY id")
    without = db.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL")
    plan = _step(toolkit_json(db, "plan", "milestone-3")[1], "create-models-for-experiments")
    assert plan["rows"] == without > 0
    announced = {r["experiment_id"]: r["slug"] for a in plan["anomalies"] if a["kind"].startswith("slug")
                 for r in a["rows"]}

    code, doc = toolkit_json(db, "migrate", "milestone-3", "--batch-size", "7")
    assert code == 0, doc
    assert next(p for p in doc["result"]["passes"] if p["name"] == "create-models-for-experiments")["rows"] == without
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL") == 0
    assert db.rows("SELECT id, name FROM ml_experiments ORDER BY id") == names_before  # names kept
    created = {r.experiment_id: r for r in db.rows("""
        SELECT e.id AS experiment_id, e.name AS experiment_name, e.iid, m.name, m.display_name,
               m.project_id = e.project_id AS same_project, m.user_id IS NOT DISTINCT FROM e.user_id AS same_user,
               m.created_at = e.created_at AS same_created
        FROM toolkit.m3_created_models l JOIN ml_models m ON m.id = l.model_id
        JOIN ml_experiments e ON e.id = l.experiment_id""")}
    assert len(created) == without
    for exp_id, row in created.items():
        assert row.display_name == row.experiment_name
        assert slug.is_valid_model_name(row.name)
        assert row.same_project and row.same_user and row.same_created
        if exp_id in announced:
            assert row.name == announced[exp_id]
        else:
            assert row.name == slug.base_slug(row.experiment_name)
    assert db.scalar("SELECT bool_and(display_name = name) FROM ml_models WHERE id NOT IN "
                     "(SELECT model_id FROM toolkit.m3_created_models)")
    # metadata followed the experiments to their models
    assert db.scalar("""SELECT count(*) FROM ml_experiment_metadata em JOIN ml_experiments e ON e.id = em.experiment_id
                        WHERE NOT EXISTS (SELECT 1 FROM ml_model_metadata mm
                                          WHERE mm.model_id = e.model_id AND mm.name = em.name)""") == 0
    assert db.scalar("""SELECT count(*) FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id
                        WHERE c.model_id IS DISTINCT FROM e.model_id""") == 0
    assert toolkit(db, "verify", "milestone-3").exit_code == 0
    assert toolkit_json(db, "migrate", "milestone-3")[1]["result"]["rows"] == 0


def test_adversarial_slugs_and_metadata_clashes(adversarial_db):
    db = adversarial_db
    ready_for_m3(db, "adversarial")
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


@pytest.mark.parametrize("profile", ["realistic", "adversarial"])
def test_rollback_removes_exactly_what_was_created(make_database, profile):
    db = make_database(f"{profile}:small")
    ready_for_m3(db, profile)
    schema_before, data_before = schema_snapshot(db), snapshot(db, M3_TABLES)
    assert toolkit(db, "migrate", "milestone-3", "--batch-size", "5").exit_code == 0
    result = toolkit(db, "rollback", "milestone-3", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert schema_snapshot(db) == schema_before
    assert snapshot(db, M3_TABLES) == data_before
    assert db.scalar("SELECT count(*) FROM toolkit.m3_created_models") == 0
    assert db.scalar("SELECT count(*) FROM toolkit.m3_metadata_clashes") == 0


def test_rollback_keeps_a_model_gitlab_has_used_since(realistic_db):
    db = realistic_db
    ready_for_m3(db, "realistic")
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


def test_killed_run_resumes_to_the_same_models(make_database):
    killed, clean = make_database("adversarial:small"), make_database("adversarial:small")
    for db in (killed, clean):
        ready_for_m3(db, "adversarial")
    died = toolkit_process(killed, "migrate", "milestone-3", "--batch-size", "5",
                           env={FAULT_KILL_AFTER_BATCHES_ENV: "4"})
    assert died.returncode == -signal.SIGKILL
    assert 0 < killed.scalar("SELECT count(*) FROM toolkit.m3_created_models") < \
        clean.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL")
    assert toolkit_process(killed, "migrate", "milestone-3", "--batch-size", "5").returncode == 0
    assert toolkit_process(clean, "migrate", "milestone-3", "--batch-size", "5").returncode == 0
    assert snapshot(killed, M3_TABLES) == snapshot(clean, M3_TABLES)
    assert killed.rows("SELECT model_id, experiment_id FROM toolkit.m3_created_models ORDER BY 1") == \
        clean.rows("SELECT model_id, experiment_id FROM toolkit.m3_created_models ORDER BY 1")


def test_experiments_created_while_and_after_it_runs_end_up_with_models(realistic_db):
    db = realistic_db
    ready_for_m3(db, "realistic")
    project = db.scalar("SELECT min(id) FROM projects")
    stop = threading.Event()
    made: list[int] = []

    def application() -> None:
        engine = sa.create_engine(db.engine.url)
        n = 0
        while not stop.is_set():
            n += 1
            with engine.begin() as conn:
                exp = conn.execute(sa.text("""
                    INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
                    SELECT now(), now(), max(iid) + 1, :p, 'Live experiment ' || :n
                    FROM ml_experiments WHERE project_id = :p RETURNING id"""), {"p": project, "n": n}).scalar()
                conn.execute(sa.text("""
                    INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid, project_id)
                    VALUES (now(), now(), :e, gen_random_uuid(), :p)"""), {"e": exp, "p": project})
                made.append(exp)
            time.sleep(0.03)
        engine.dispose()

    writer = threading.Thread(target=application)
    writer.start()
    try:
        result = Runner(db.engine, RunOptions(batch_size=3, pause_ms=20), plan=registry.plan()).migrate(registry.get("milestone-3"))
    finally:
        time.sleep(0.2)  # and a few after the run
        stop.set()
        writer.join(30)
    assert result.complete
    during = db.scalar("SELECT count(*) FROM toolkit.m3_created_models WHERE experiment_id = ANY(:e)", e=made)
    assert during > 0  # the catch-up rounds took experiments written during the run
    assert toolkit(db, "migrate", "milestone-3").exit_code == 0  # and a re-run the rest
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL") == 0
    assert db.scalar("SELECT count(*) FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id "
                     "WHERE c.model_id IS DISTINCT FROM e.model_id") == 0
    assert toolkit(db, "verify", "milestone-3").exit_code == 0


def test_models_gitlab_creates_after_milestone_3_get_a_display_name(realistic_db):
    db = realistic_db
    ready_for_m3(db, "realistic")
    assert toolkit(db, "migrate", "milestone-3").exit_code == 0
    db.execute("INSERT INTO ml_models (created_at, updated_at, project_id, name) "
               "SELECT now(), now(), min(id), 'made-by-gitlab' FROM projects")
    assert db.scalar("SELECT display_name FROM ml_models WHERE name = 'made-by-gitlab'") == "made-by-gitlab"


def test_milestone_3_waits_for_milestone_2(realistic_db):
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    result = toolkit(realistic_db, "migrate", "milestone-3")
    assert result.exit_code == ExitCode.REFUSED and "milestone-2 does not verify" in result.output
