"""``experiments/create`` at each stage of the blueprint (toolkit/mlflow_api/stages.py), and
what the milestones and their rollbacks do with what it made.

- milestone 3 applied or running: the experiment and its display-named model, made by
  milestone 3's own batch; its rollback removes the model, its catch-up makes no second;
- milestone 4 applied: the model only, the MLflow experiment id kept where the view reads
  it (``experiments/get``, ``runs/search`` answer it); ``rollback milestone-4`` rebuilds the
  experiment with its tags and sets the sequence past it;
- milestone 4's gate: every experiment has its model and its tags;
- two sessions: a write at the archive and milestone 4's rebuild do not lose an experiment.
"""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa
from helpers import toolkit, toolkit_process

from toolkit.engine.batches import FAULT_KILL_AFTER_ACTIONS_ENV
from toolkit.errors import ExitCode
from toolkit.milestones import slug
from toolkit.milestones.m4.preconditions import preconditions
from toolkit.mlflow_api import stage_experiments, stages
from toolkit.mlflow_api.errors import ApiError
from toolkit.mlflow_api.server import Api
from toolkit.mlflow_api.stages import Stage
from toolkit.mlflow_api.views import View

BASE = "https://gitlab.example.com"
TAGS = [("purpose", "a tag"), ("mlflow.note.content", "kept with the model")]


def _project(db) -> int:
    return db.scalar("SELECT min(project_id) FROM ml_models")


def create(db, name: str, iid: int, tags=TAGS, expect: Stage | None = None) -> stages.ExperimentRef:
    """What the server's experiments/create does: the stage read in the write's transaction."""
    with db.engine.begin() as conn:
        stage = stages.stage_of(conn)
        if expect is not None:
            assert stage is expect
        return stage_experiments.create_experiment(conn, stage, project_id=_project(db), name=name, tags=list(tags),
                                        user_id=None, iid=iid)


def model_of(db, experiment_id: int) -> dict:
    return dict(db.rows("""
        SELECT m.id, m.name, m.display_name, l.run_id, l.experiment_id FROM ml_models m
        JOIN toolkit.m3_created_models l ON l.model_id = m.id WHERE l.experiment_id = :e""",
                        e=experiment_id)[0]._mapping)


def model_tags(db, model_id: int) -> set[tuple[str, str]]:
    return {tuple(r) for r in db.rows("SELECT name, value FROM ml_model_metadata WHERE model_id = :m", m=model_id)}


def served(db, iid: int) -> tuple[dict, dict]:
    with db.engine.connect() as conn:
        view = View(conn, str(_project(db)), BASE)
        return (view.get_experiment({"experiment_id": str(iid)})["experiment"],
                view.search_runs({"experiment_ids": [str(iid)]}, 100))


@pytest.fixture
def ready(before_milestone):
    return lambda: before_milestone(4)  # milestones 1-3 applied


def test_from_milestone_3_then_after_milestone_4_then_both_rollbacks(ready):
    db = ready()
    made = create(db, "Made after milestone 3 / ünïcode", 9001, expect=Stage.MODELS)
    model = model_of(db, made.id)
    assert made.model_id == model["id"] and model["run_id"] is None
    assert model["display_name"] == "Made after milestone 3 / ünïcode"
    assert model["name"] == slug.assign(model["display_name"], 9001, set())[0] == "made_after_milestone_3_unicode"
    assert model_tags(db, model["id"]) == set(TAGS)
    assert db.scalar("SELECT model_id FROM ml_experiments WHERE id = :e", e=made.id) == model["id"]
    # milestone 4's gate accepts it (its model and its tags), the drop carries it over
    result = toolkit(db, "migrate", "milestone-4", "--yes")
    assert result.exit_code == 0, result.output
    with db.engine.connect() as conn:
        assert stages.stage_of(conn) is Stage.ARCHIVE
    late = create(db, "Made after milestone 4", 9002, tags=[("stage", "archive")], expect=Stage.ARCHIVE)
    late_model = model_of(db, late.id)
    assert late.model_id == late_model["id"] and late_model["display_name"] == "Made after milestone 4"
    assert model_tags(db, late_model["id"]) == {("stage", "archive")}
    assert late.id > db.scalar("SELECT max(id) FROM toolkit.m4_archive_ml_experiments WHERE id <> :e", e=late.id)
    assert db.scalar("SELECT model_id FROM toolkit.mlflow_experiment_ids WHERE iid = 9002") == late.model_id
    with db.engine.begin() as conn:
        found = stages.find_experiment(conn, Stage.ARCHIVE, _project(db), 9002)
        assert found == stages.ExperimentRef(late.id, 9002, _project(db), late.model_id,
                                             "Made after milestone 4", False)
        with pytest.raises(sa.exc.IntegrityError):
            stage_experiments.create_experiment(conn, Stage.ARCHIVE, project_id=_project(db), name="Made after milestone 4",
                                     tags=[], user_id=None, iid=9003)
    # a run under it (what runs/create will insert), then the reads answer both
    db.execute("""INSERT INTO ml_candidates (created_at, updated_at, project_id, eid, status, model_id, name)
                  VALUES (now(), now(), :p, gen_random_uuid(), 0, :m, 'late run')""",
               p=_project(db), m=late.model_id)
    experiment, runs = served(db, 9002)
    assert experiment["name"] == "Made after milestone 4" and [r["info"]["run_name"] for r in runs["runs"]] \
        == ["late run"]
    assert served(db, 9001)[0]["name"] == "Made after milestone 3 / ünïcode"
    result = toolkit(db, "verify")
    assert result.exit_code == 0, result.output

    result = toolkit(db, "rollback", "milestone-4")
    assert result.exit_code == 0, result.output
    rebuilt = {r.iid: r for r in db.rows("SELECT id, iid, name, model_id FROM ml_experiments WHERE iid > 9000")}
    assert rebuilt[9002].id == late.id and rebuilt[9002].model_id == late.model_id
    assert {tuple(r) for r in db.rows("SELECT name, value FROM ml_experiment_metadata WHERE experiment_id = :e",
                                      e=late.id)} == {("stage", "archive")}
    assert db.scalar("SELECT experiment_id FROM ml_candidates WHERE name = 'late run'") == late.id
    # the sequences were set past the rows made after milestone 4: GitLab's next ones fit
    db.execute("""INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
                  VALUES (now(), now(), 9100, :p, 'GitLab after the rollback')""", p=_project(db))
    assert db.scalar("SELECT id FROM ml_experiments WHERE iid = 9100") > late.id
    db.execute("""INSERT INTO ml_experiment_metadata (created_at, updated_at, experiment_id, name, value)
                  VALUES (now(), now(), :e, 'k', 'v')""", e=late.id)

    db.execute("DELETE FROM ml_experiment_metadata WHERE name = 'k'")
    db.execute("DELETE FROM ml_experiments WHERE iid = 9100")
    db.execute("DELETE FROM ml_candidates WHERE name = 'late run'")
    result = toolkit(db, "rollback", "milestone-3")
    assert result.exit_code == 0, result.output
    assert db.scalar("SELECT count(*) FROM ml_models WHERE id IN (:a, :b)", a=made.model_id, b=late.model_id) == 0
    left = db.rows("SELECT iid, model_id FROM ml_experiments WHERE iid IN (9001, 9002) ORDER BY iid")
    assert [tuple(r) for r in left] == [(9001, None), (9002, None)]  # as experiments/create made them before


def test_after_the_archive_drop_the_kept_ids_hold_it(ready):
    db = ready()
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    before_drop = create(db, "Made at the archive", 9001, tags=[("k", "archive")], expect=Stage.ARCHIVE)
    result = toolkit(db, "archive", "drop", "--yes")
    assert result.exit_code == 0, result.output
    made = create(db, "Made after the archive drop", 9002, tags=[("k", "kept")], expect=Stage.KEPT_IDS)
    assert made.id > before_drop.id
    with db.engine.begin() as conn:
        assert stages.find_experiment(conn, Stage.KEPT_IDS, _project(db), 9001).model_id == before_drop.model_id
        assert stages.find_experiment(conn, Stage.KEPT_IDS, _project(db), 9002) == made
    for iid, name, value in ((9001, "Made at the archive", "archive"), (9002, "Made after the archive drop", "kept")):
        experiment, _ = served(db, iid)
        assert (experiment["name"], experiment["tags"]) == (name, [{"key": "k", "value": value}])
    result = toolkit(db, "verify")
    assert result.exit_code == 0, result.output


def test_while_milestone_3_runs_its_catch_up_makes_no_second_model_and_rollback_removes_it(before_milestone,
                                                                                             make_database):
    interrupted = before_milestone(3)
    died = toolkit_process(interrupted, "migrate", "milestone-3", env={FAULT_KILL_AFTER_ACTIONS_ENV: "4"})
    assert died.returncode == -9, died.stderr
    with interrupted.engine.connect() as conn:
        assert stages.stage_of(conn) is Stage.MODELS
    made = create(interrupted, "During milestone 3", 9001, expect=Stage.MODELS)
    assert made.model_id is not None
    resumed = make_database(like=interrupted)
    finished = toolkit_process(resumed, "migrate", "milestone-3")
    assert finished.returncode == 0, finished.stderr
    assert resumed.scalar("SELECT count(*) FROM ml_models WHERE display_name = 'During milestone 3'") == 1
    assert resumed.scalar("SELECT model_id FROM ml_experiments WHERE iid = 9001") == made.model_id
    assert toolkit(resumed, "verify", "milestone-3").exit_code == 0

    rolled = toolkit_process(interrupted, "rollback", "milestone-3")  # while milestone 3 is still running
    assert rolled.returncode == 0, rolled.stderr
    assert interrupted.scalar("SELECT count(*) FROM ml_models WHERE id = :m", m=made.model_id) == 0
    assert interrupted.scalar("SELECT model_id FROM ml_experiments WHERE iid = 9001") is None
    assert {tuple(r) for r in interrupted.rows(
        "SELECT name, value FROM ml_experiment_metadata WHERE experiment_id = :e", e=made.id)} == set(TAGS)


def test_the_gate_blocks_an_experiment_made_by_hand_without_its_model_or_tags(ready):
    db = ready()
    create(db, "Through the server", 9001)
    db.execute("""INSERT INTO ml_experiment_metadata (created_at, updated_at, experiment_id, name, value)
                  SELECT now(), now(), id, 'only here', 'v' FROM ml_experiments WHERE iid = 9001""")
    result = toolkit(db, "migrate", "milestone-4", "--yes")
    assert result.exit_code == ExitCode.REFUSED, result.output
    assert "every experiment has its model and its tags" in result.output, result.output
    assert "tag 'only here' tag missing on its model" in result.output
    assert "toolkit migrate milestone-3" in result.output
    db.execute("DELETE FROM ml_experiment_metadata WHERE name = 'only here'")
    db.execute("""INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
                  VALUES (now(), now(), 9002, :p, 'by hand')""", p=_project(db))
    with db.engine.connect() as conn:
        failed = [c for c in preconditions(conn) if not c.ok]
    assert [c.name for c in failed] == ["precondition: every experiment has its model and its tags"]
    assert "has no model" in failed[0].detail and "toolkit migrate milestone-3" in failed[0].remedy
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == ExitCode.REFUSED
    db.execute("DELETE FROM ml_experiments WHERE iid = 9002")
    result = toolkit(db, "migrate", "milestone-4", "--yes")  # what the server made passes
    assert result.exit_code == 0, result.output


def _waiting_on(db, relation: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.scalar("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = to_regclass(:r)", r=relation):
            return
        time.sleep(0.1)
    raise AssertionError(f"nobody waits on {relation}")


def test_a_write_at_the_archive_and_the_rebuild_do_not_lose_an_experiment(ready):
    db = ready()
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    # the write first: the rebuild waits for it, then carries it over
    with db.engine.connect() as conn:
        conn.begin()
        written = stage_experiments.create_experiment(conn, Stage.ARCHIVE, project_id=_project(db), name="in flight",
                                           tags=[("k", "v")], user_id=None, iid=9001)
        rollback = threading.Thread(target=lambda: results.append(toolkit_process(db, "rollback", "milestone-4")))
        results: list = []
        rollback.start()
        _waiting_on(db, "toolkit.m4_archive_ml_experiments")
        conn.commit()
    rollback.join(300)
    assert results[0].returncode == 0, results[0].stderr
    assert db.scalar("SELECT model_id FROM ml_experiments WHERE id = :e", e=written.id) == written.model_id
    assert db.scalar("SELECT value FROM ml_experiment_metadata WHERE experiment_id = :e", e=written.id) == "v"


def test_a_write_that_waited_for_a_schema_change_finds_the_stage_changed(ready):
    """The rebuild (here by hand: its lock, then ml_experiments back) commits while a write
    at the archive waits: the write writes nothing and says the stage changed (503)."""
    db = ready()
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    outcome: list = []

    def write() -> None:
        try:
            create(db, "waited", 9001, expect=Stage.ARCHIVE)
            outcome.append("written")
        except stages.StageChanged as changed:
            outcome.append(changed)

    with db.engine.connect() as rebuild:
        rebuild.begin()
        rebuild.execute(sa.text("LOCK TABLE toolkit.m4_archive_ml_experiments IN SHARE MODE"))
        writer = threading.Thread(target=write)
        writer.start()
        _waiting_on(db, "toolkit.m4_archive_ml_experiments")
        rebuild.execute(sa.text("CREATE TABLE ml_experiments (LIKE toolkit.m4_archive_ml_experiments)"))
        rebuild.commit()
    writer.join(60)
    assert isinstance(outcome[0], stages.StageChanged), outcome
    assert db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments WHERE iid = 9001") == 0
    assert db.scalar("SELECT count(*) FROM ml_models WHERE display_name = 'waited'") == 0


def test_a_write_at_milestone_3s_stage_and_milestone_4_do_not_lose_an_experiment(ready):
    """The write first, uncommitted, while milestone 4 starts: milestone 4 waits for it
    (its archive triggers, its drops), then archives and keeps it."""
    db = ready()
    with db.engine.connect() as conn:
        conn.begin()
        written = stage_experiments.create_experiment(conn, Stage.MODELS, project_id=_project(db), name="in flight",
                                           tags=[("k", "v")], user_id=None, iid=9001)
        results: list = []
        migrate = threading.Thread(target=lambda: results.append(
            toolkit_process(db, "migrate", "milestone-4", "--yes")))
        migrate.start()
        deadline = time.monotonic() + 60
        while not db.scalar("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation IN "
                            "(to_regclass('ml_experiments'), to_regclass('ml_models'))"):
            assert time.monotonic() < deadline, "milestone 4 never waited for the write"
            time.sleep(0.1)
        conn.commit()
    migrate.join(300)
    assert results[0].returncode == 0, results[0].stderr
    assert db.scalar("SELECT model_id FROM toolkit.m4_archive_ml_experiments WHERE id = :e",
                     e=written.id) == written.model_id
    assert db.scalar("SELECT model_id FROM toolkit.mlflow_experiment_ids WHERE iid = 9001") == written.model_id
    assert served(db, 9001)[0]["tags"] == [{"key": "k", "value": "v"}]


def test_a_write_that_waited_for_milestone_4s_drop_finds_the_stage_changed(ready):
    """The drop (here by hand, as milestone 4's last transaction takes it) commits while a
    write at milestone 3's stage waits for ml_experiments: it writes nothing (503)."""
    db = ready()
    outcome: list = []

    def write() -> None:
        try:
            create(db, "waited", 9001, expect=Stage.MODELS)
            outcome.append("written")
        except stages.StageChanged as changed:
            outcome.append(changed)

    with db.engine.connect() as drop:
        drop.begin()
        drop.execute(sa.text("LOCK TABLE ml_experiments IN ACCESS EXCLUSIVE MODE"))
        writer = threading.Thread(target=write)
        writer.start()
        _waiting_on(db, "ml_experiments")
        drop.execute(sa.text("DROP TABLE ml_experiment_metadata, ml_experiments CASCADE"))
        drop.commit()
    writer.join(60)
    assert isinstance(outcome[0], stages.StageChanged), outcome
    assert db.scalar("SELECT count(*) FROM ml_models WHERE display_name = 'waited'") == 0


def test_a_read_whose_table_is_dropped_under_it_is_answered_503_never_500(make_database):
    """Milestone 4 drops ml_experiment_metadata before ml_experiments, each in its own
    transaction: a read between the two finds its table gone at every attempt. It is a
    schema change under way, answered 503 (the MLflow client retries), as a write's is."""
    db = make_database("realistic:small")
    project, name = db.rows("SELECT project_id, name FROM ml_experiments ORDER BY id LIMIT 1")[0]
    api = Api.connect(db.url_text)
    try:
        found = api.answer("experiments/get-by-name", str(project), "http://mlflow.test",
                           {"experiment_name": name})
        assert found["experiment"]["name"] == name
        db.execute("DROP TABLE ml_experiment_metadata")
        with pytest.raises(ApiError) as refused:
            api.answer("experiments/get-by-name", str(project), "http://mlflow.test",
                       {"experiment_name": name})
        assert refused.value.status == 503, refused.value.body
    finally:
        api.close()
