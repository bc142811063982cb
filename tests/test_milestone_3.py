"""Milestone 3: adversarial slugs and metadata clashes, models GitLab uses or creates later,
a kill part-way and between its two passes, the gate. A model for every experiment as
planned, rollback, resume and a concurrent writer are the contract's (test_contract.py)."""

from __future__ import annotations

import signal

from contract import CANDIDATES_FOLLOW_EXPERIMENTS, KILL_BATCH_SIZE
from helpers import end_state, ledgers, schema_snapshot, snapshot, toolkit, toolkit_json, toolkit_process

from toolkit.engine.batches import FAULT_KILL_AFTER_ACTIONS_ENV, FAULT_KILL_AFTER_BATCHES_ENV
from toolkit.errors import ExitCode
from toolkit.milestones import MILESTONES
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.verify.fingerprint import take


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
    assert "1 model kept" in result.output  # singular: one model
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


def _mlflow_view(db) -> dict:
    with db.engine.connect() as conn:
        view = take(conn).mlflow
        conn.rollback()
    return view


def test_a_kill_between_the_two_passes_keeps_the_mlflow_view_then_resumes_or_rolls_back_exactly(
        milestone_states, make_database):
    """Killed right after the experiments are linked and before link-candidates starts: the
    MLflow view is what it was before the milestone (candidates reach their experiment
    through experiment_id), milestone 2 still verifies (the gate lets the resume in), a
    resume ends where an uninterrupted run does, and a rollback from there is exact."""
    before = milestone_states.before("adversarial", 3)
    clean, applied = milestone_states.applied("adversarial", 3)  # batches of KILL_BATCH_SIZE too
    assert applied.code == 0, applied.doc
    actions = [a.name for step in MILESTONES["milestone-3"].steps for a in step.forward()]
    assert actions[-2:] == ["create-models-for-experiments", "link-candidates"]
    batch = str(KILL_BATCH_SIZE)

    killed = make_database(like=before)
    died = toolkit_process(killed, "migrate", "milestone-3", "--yes", "--batch-size", batch,
                           env={FAULT_KILL_AFTER_ACTIONS_ENV: str(len(actions) - 1)})
    assert died.returncode == -signal.SIGKILL, died.stderr
    # in between: every experiment has its model, the candidates of the new ones not yet
    assert killed.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL") == 0
    waiting = killed.scalar(CANDIDATES_FOLLOW_EXPERIMENTS)
    assert waiting > 0
    assert killed.scalar("SELECT count(*) FROM toolkit.checkpoints WHERE milestone = 'milestone-3' "
                         "AND step = 'link-candidates'") == 0
    assert _mlflow_view(killed) == _mlflow_view(before)
    # what is left is the candidate pass, and verify says so (and only that)
    plan = toolkit_json(killed, "plan", "milestone-3")[1]["result"]["milestones"][0]
    assert {s["step"]: s["rows"] for s in plan["steps"] if s["rows"]} == {"link-candidates": waiting}
    code, doc = toolkit_json(killed, "verify")  # every milestone started: 1, 2 and 3
    assert code == ExitCode.VERIFY_FAILED
    failed = {(m["milestone"], c["name"]) for m in doc["error"]["details"]["result"]["milestones"]
              for c in m["checks"] if not c["ok"]}
    assert failed == {("milestone-3", "every candidate's model_id is its experiment's model")}, failed

    # a rollback from the state between the passes is exact
    rolled = make_database(like=killed)
    result = toolkit(rolled, "rollback", "milestone-3", "--batch-size", batch)
    assert result.exit_code == 0, result.output
    assert snapshot(rolled, ML_TABLE_NAMES) == snapshot(before, ML_TABLE_NAMES)
    assert schema_snapshot(rolled) == schema_snapshot(before)
    assert {t: r for t, r in ledgers(rolled).items() if r} == {t: r for t, r in ledgers(before).items() if r}

    # and a resume ends where the uninterrupted run did
    resumed = toolkit_process(killed, "migrate", "milestone-3", "--yes", "--batch-size", batch)
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    assert killed.scalar(CANDIDATES_FOLLOW_EXPERIMENTS) == 0
    assert end_state(killed) == end_state(clean)
