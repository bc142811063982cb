"""The model-registry writes (toolkit/mlflow_api/registry_writes.py) on a real database, at
each stage of the blueprint: called as the server calls them, in a transaction with a
WriteContext, their answers and rows checked against what GitLab's services write
(docs/mlflow.md, "Writes"):

* CMS app/services/ml/create_model_service.rb @4dbbab7b, UMS update_model_service.rb @4dbbab7b,
  DMS destroy_model_service.rb @4dbbab7b, CMVS create_model_version_service.rb @de09f039,
  UMVS model_versions/update_model_version_service.rb @9297025d
* RR lib/api/ml/mlflow/registered_models.rb @04e80ac1, MV model_versions.rb @1737a58c,
  AH api_helpers.rb @f7f952ac

One adversarial database for the module, walked forward: the tests run in file order
(stage EXPERIMENTS on the fresh copy, then milestones 1-3: MODELS, then milestone 4: ARCHIVE).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import toolkit
from mlflow_serving import adversarial_database

from toolkit.mlflow_api.errors import ApiError
from toolkit.mlflow_api.registry_writes import WRITES
from toolkit.mlflow_api.stages import Stage, WriteContext, stage_of
from toolkit.names import TRANSITION_TRIGGERS

BASE = "http://gitlab.test"
NOT_FOUND = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
EXISTS = (400, {"error_code": "RESOURCE_ALREADY_EXISTS"})


@pytest.fixture(scope="module")
def db(pg_server, templates) -> Iterator:
    with adversarial_database(pg_server, templates, "registry_writes") as database:
        yield database


@pytest.fixture(scope="module")
def who(db) -> tuple[int, int]:
    """A project and a Maintainer of it (GitLab's destroy_package, which deleting a model with
    packages needs), not an administrator."""
    project = db.scalar("SELECT min(project_id) FROM project_authorizations WHERE access_level = 40")
    user = db.scalar("SELECT min(a.user_id) FROM project_authorizations a JOIN users u ON u.id = a.user_id "
                     "WHERE a.project_id = :p AND a.access_level = 40 AND NOT u.admin", p=project)
    return project, user


def write(db, who, endpoint: str, **params: Any) -> tuple[int, Any, Stage]:
    """One write in its own transaction, as the server runs it: (status, document, stage);
    an error answer rolls the transaction back."""
    project, user = who
    with db.engine.connect() as conn, conn.begin() as tx:
        stage = stage_of(conn)
        ctx = WriteContext(project, user, stage, BASE, endpoint)
        try:
            answer = WRITES[endpoint](conn, ctx, params)
        except ApiError as exc:
            tx.rollback()
            return exc.status, exc.document(), stage
    return 200, answer, stage


def returning(db, sql: str, one: bool = True, **params: Any) -> Any:
    """An INSERT … RETURNING, committed: its one value, or its row."""
    with db.engine.begin() as conn:
        row = conn.execute(sa.text(sql), params).one()
    return row[0] if one else row


def recorded(db, endpoint: str) -> set[tuple[str, str]]:
    if not db.scalar("SELECT to_regclass('toolkit.mlflow_writes') IS NOT NULL"):
        return set()
    return {(r.table_name, r.action) for r in db.rows(
        "SELECT table_name, action FROM toolkit.mlflow_writes WHERE endpoint = :e", e=endpoint)}


def model_row(db, who, name: str):
    return db.rows("SELECT * FROM ml_models WHERE project_id = :p AND name = :n", p=who[0], n=name)


def test_stage_experiments_as_gitlab_does_today(db, who):
    project, user = who
    before_iid = db.scalar("SELECT COALESCE(max(iid), 0) FROM ml_experiments WHERE project_id = :p", p=project)
    tags = [{"key": "team", "value": "vision"}, {"key": "owner", "value": "ana"}]
    status, answer, stage = write(db, who, "registered-models/create", name="churn-model",
                                  description="first", tags=tags)
    assert stage is Stage.EXPERIMENTS
    assert status == 200, answer
    document = answer["registered_model"]
    assert (document["name"], document["description"], document["user_id"]) == ("churn-model", "first", str(user))
    assert document["tags"] == tags and document["latest_versions"] == []
    # CMS: the model, its default experiment "[model]<name>" with the next iid, its tags
    [model] = model_row(db, who, "churn-model")
    assert (model.user_id, model.description) == (user, "first")
    [experiment] = db.rows("SELECT * FROM ml_experiments WHERE model_id = :m", m=model.id)
    assert (experiment.name, experiment.iid, experiment.user_id, experiment.project_id) == \
        ("[model]churn-model", before_iid + 1, user, project)
    assert [(r.name, r.value, r.project_id) for r in db.rows(
        "SELECT * FROM ml_model_metadata WHERE model_id = :m ORDER BY id", m=model.id)] == \
        [("team", "vision", project), ("owner", "ana", project)]

    # RR: every failure of the service is 400 RESOURCE_ALREADY_EXISTS; a missing name is Grape's
    models = db.scalar("SELECT count(*) FROM ml_models")
    experiments = db.scalar("SELECT count(*) FROM ml_experiments")
    assert write(db, who, "registered-models/create", name="churn-model")[:2] == EXISTS
    assert write(db, who, "registered-models/create", name="bad name!")[:2] == EXISTS
    assert write(db, who, "registered-models/create", name="dup-tags",
                 tags=[{"key": "a", "value": "1"}, {"key": "a", "value": "2"}])[:2] == EXISTS
    assert write(db, who, "registered-models/create", description="x")[:2] == (400, {"error": "name is missing"})
    assert write(db, who, "registered-models/create", name="t", tags="nope")[:2] == (400, {"error": "tags is invalid"})
    assert (db.scalar("SELECT count(*) FROM ml_models"), db.scalar("SELECT count(*) FROM ml_experiments")) == \
        (models, experiments), "a refused create leaves nothing behind"

    # UMS: the description, cleared when none is sent
    status, answer, _ = write(db, who, "registered-models/update", name="churn-model", description="second")
    assert status == 200 and answer["registered_model"]["description"] == "second"
    assert write(db, who, "registered-models/update", name="churn-model", description="x" * 10_001)[:2] == \
        (400, {"error_code": "INVALID_PARAMETER_VALUE",
               "message": "Validation failed: Description is too long (maximum is 10000 characters)"})
    assert db.scalar("SELECT description FROM ml_models WHERE id = :m", m=model.id) == "second"
    status, answer, _ = write(db, who, "registered-models/update", name="churn-model")
    assert status == 200 and answer["registered_model"]["description"] == ""  # update!(description: nil)
    assert db.scalar("SELECT description FROM ml_models WHERE id = :m", m=model.id) is None
    assert write(db, who, "registered-models/update", name="no-such-model", description="x")[:2] == NOT_FOUND
    assert write(db, who, "registered-models/update", description="x")[:2] == NOT_FOUND

    # CMVS: 1.0.0, then the major incremented; the version's run in the default experiment;
    # an ml_model package by the token's user
    status, answer, _ = write(db, who, "model-versions/create", name="churn-model", description="v1",
                              tags=[{"key": "k", "value": "v"}])
    assert status == 200, answer
    first = answer["model_version"]
    assert (first["name"], first["aliases"], first["description"], first["tags"]) == \
        ("churn-model", ["1.0.0"], "v1", [{"key": "k", "value": "v"}])
    [version] = db.rows("SELECT * FROM ml_model_versions WHERE id = :v", v=int(first["version"]))
    assert (version.version, version.semver_major, version.semver_minor, version.semver_patch) == ("1.0.0", 1, 0, 0)
    [run] = db.rows("SELECT * FROM ml_candidates WHERE model_version_id = :v", v=version.id)
    assert (run.experiment_id, str(run.eid), run.project_id, run.start_time, run.user_id) == \
        (experiment.id, first["run_id"], project, 0, None)
    assert run.internal_id == db.scalar("SELECT max(internal_id) FROM ml_candidates WHERE project_id = :p",
                                        p=project)
    [package] = db.rows("SELECT * FROM packages_packages WHERE id = :k", k=version.package_id)
    assert (package.name, package.version, package.package_type, package.creator_id, package.status) == \
        ("churn-model", "1.0.0", 14, user, 0)
    status, answer, _ = write(db, who, "model-versions/create", name="churn-model",
                              tags=[{"key": "gitlab.version", "value": "4.2.0-rc.1"}])
    assert status == 200 and answer["model_version"]["aliases"] == ["4.2.0-rc.1"]
    assert db.scalar("SELECT semver_prerelease FROM ml_model_versions WHERE id = :v",
                     v=int(answer["model_version"]["version"])) == "rc.1"
    status, answer, _ = write(db, who, "model-versions/create", name="churn-model")
    assert status == 200 and answer["model_version"]["aliases"] == ["5.2.0-rc.1"]  # SemVer#to_s: only the major moves
    # errors: lists, as GitLab's ServiceResponse carries them
    assert write(db, who, "model-versions/create", name="churn-model",
                 tags=[{"key": "gitlab.version", "value": "1.0.0"}])[:2] == \
        (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": ["Version has already been taken"]})
    assert write(db, who, "model-versions/create", name="churn-model",
                 tags=[{"key": "gitlab.version", "value": "one"}])[:2] == \
        (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": ["Version must be semantic version"]})
    assert write(db, who, "model-versions/create", name="churn-model",
                 run_id="00000000-0000-0000-0000-000000000000")[:2] == \
        (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": ["Run not found"]})
    assert write(db, who, "model-versions/create", name="churn-model", run_id=first["run_id"])[:2] == \
        (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": ["Run has already a model version"]})
    assert write(db, who, "model-versions/create", name="no-such-model")[:2] == NOT_FOUND

    # UMVS
    status, answer, _ = write(db, who, "model-versions/update", name="churn-model", version="1.0.0",
                              description="better")
    assert status == 200 and answer["model_version"]["description"] == "better"
    assert db.scalar("SELECT description FROM ml_model_versions WHERE id = :v", v=version.id) == "better"
    assert write(db, who, "model-versions/update", name="churn-model", version="9.9.9", description="x")[:2] == \
        (400, {"error_code": "UPDATE_FAILED"})
    assert write(db, who, "model-versions/update", name="churn-model", version="1.0.0", description="")[0] == 200
    assert db.scalar("SELECT description FROM ml_model_versions WHERE id = :v", v=version.id) == ""
    assert write(db, who, "model-versions/update", name="churn-model", version="1.0.0")[:2] == \
        (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": None})

    # DMS: packages pending destruction, then the model and all that cascades from it
    packages = [r[0] for r in db.rows("SELECT package_id FROM ml_model_versions WHERE model_id = :m", m=model.id)]
    developer = db.scalar("SELECT min(a.user_id) FROM project_authorizations a JOIN users u ON u.id = a.user_id "
                          "WHERE a.project_id = :p AND a.access_level = 30 AND NOT u.admin", p=project)
    assert developer is not None
    assert write(db, (project, developer), "registered-models/delete", name="churn-model")[:2] == \
        (400, {"message": "Model could not be deleted"})  # DMS: destroy_package is Maintainer's
    assert len(model_row(db, who, "churn-model")) == 1
    assert write(db, who, "registered-models/delete", name="churn-model")[:2] == (200, {})
    assert model_row(db, who, "churn-model") == []
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE id = :e", e=experiment.id) == 0
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE id = :c", c=run.id) == 0
    assert {r[0] for r in db.rows("SELECT status FROM packages_packages WHERE id = ANY(:k)", k=packages)} == {4}
    assert write(db, who, "registered-models/delete", name="churn-model")[:2] == NOT_FOUND
    assert write(db, who, "registered-models/delete")[:2] == NOT_FOUND


def test_a_run_becomes_a_version_and_iids_come_from_internal_ids(db, who):
    project, _ = who
    # GitLab's internal_ids (db/structure.sql), in the sandbox's schema (toolkit/schema/gitlab.py)
    assert db.scalar("SELECT to_regclass('internal_ids') IS NOT NULL")
    try:
        highest = db.scalar("SELECT COALESCE(max(iid), 0) FROM ml_experiments WHERE project_id = :p", p=project)
        db.execute("DELETE FROM internal_ids WHERE project_id = :p", p=project)  # the earlier tests' rows
        db.execute("INSERT INTO internal_ids (project_id, usage, last_value) VALUES (:p, 12, :v)",
                   p=project, v=highest + 10)  # a live GitLab handed out ten more
        assert write(db, who, "registered-models/create", name="promoted")[0] == 200
        [model] = model_row(db, who, "promoted")
        [experiment] = db.rows("SELECT * FROM ml_experiments WHERE model_id = :m", m=model.id)
        assert experiment.iid == highest + 11
        assert db.scalar("SELECT last_value FROM internal_ids WHERE project_id = :p AND usage = 12",
                         p=project) == highest + 11

        # a run of the model's experiment, with its ml_model package, becomes the version (CMVS)
        runs_before = db.scalar("SELECT max(internal_id) FROM ml_candidates WHERE project_id = :p", p=project)
        package = returning(db, """
            INSERT INTO packages_packages (created_at, updated_at, project_id, name, version, package_type)
            VALUES (now(), now(), :p, 'promoted', 'candidate_1', 14) RETURNING id""", p=project)
        run = returning(db, """
            INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid, project_id, internal_id,
                                       package_id, name, status)
            VALUES (now(), now(), :e, gen_random_uuid(), :p, :i, :k, 'trained', 2) RETURNING id, eid""",
                        e=experiment.id, p=project, i=runs_before + 1, k=package, one=False)
        status, answer, _ = write(db, who, "model-versions/create", name="promoted", run_id=str(run.eid))
        assert status == 200, answer
        assert answer["model_version"]["run_id"] == str(run.eid)
        version = db.rows("SELECT * FROM ml_model_versions WHERE id = :v", v=int(answer["model_version"]["version"]))[0]
        assert (version.version, version.package_id) == ("1.0.0", package)
        assert db.scalar("SELECT model_version_id FROM ml_candidates WHERE id = :c", c=run.id) == version.id
        assert tuple(db.rows("SELECT name, version FROM packages_packages WHERE id = :k", k=package)[0]) == \
            ("promoted", "1.0.0")
        assert db.scalar("SELECT count(*) FROM ml_candidates WHERE model_version_id = :v", v=version.id) == 1
        # a run of another experiment is refused; a new version's run takes its iid from internal_ids
        other = db.scalar("SELECT eid FROM ml_candidates WHERE project_id = :p AND model_version_id IS NULL "
                          "AND experiment_id <> :e LIMIT 1", p=project, e=experiment.id)
        assert write(db, who, "model-versions/create", name="promoted", run_id=str(other))[:2] == \
            (400, {"error_code": "INVALID_PARAMETER_VALUE",
                   "message": ["Run's experiment does not belong to this model"]})
        status, answer, _ = write(db, who, "model-versions/create", name="promoted")
        assert status == 200 and answer["model_version"]["aliases"] == ["2.0.0"]
        new_run = db.scalar("SELECT internal_id FROM ml_candidates WHERE eid = CAST(:e AS uuid)",
                            e=answer["model_version"]["run_id"])
        assert new_run == db.scalar("SELECT last_value FROM internal_ids WHERE project_id = :p AND usage = 13",
                                    p=project) == runs_before + 2
    finally:
        db.execute("DELETE FROM internal_ids WHERE project_id = :p", p=project)


def test_stage_models_after_milestones_1_to_3(db, who):
    for milestone in ("milestone-1", "milestone-2", "milestone-3"):
        result = toolkit(db, "migrate", milestone, "--yes")
        assert result.exit_code == 0, result.output
    status, answer, stage = write(db, who, "registered-models/create", name="Fraud.Detector_2",
                                  tags=[{"key": "t", "value": "1"}])
    assert stage is Stage.MODELS
    assert status == 200, answer
    [model] = model_row(db, who, "Fraud.Detector_2")
    assert model.display_name == "Fraud.Detector_2"  # milestone 3's trigger
    [experiment] = db.rows("SELECT * FROM ml_experiments WHERE model_id = :m", m=model.id)
    assert experiment.name == "[model]Fraud.Detector_2"
    assert recorded(db, "registered-models/create") == \
        {("ml_models", "insert"), ("ml_experiments", "insert"), ("ml_model_metadata", "insert")}
    status, answer, _ = write(db, who, "model-versions/create", name="Fraud.Detector_2")
    assert status == 200, answer
    [run] = db.rows("SELECT c.* FROM ml_candidates c JOIN ml_model_versions v ON v.id = c.model_version_id "
                    "WHERE v.model_id = :m", m=model.id)
    assert (run.experiment_id, run.model_id) == (experiment.id, model.id)  # model_id: milestone 2's trigger
    assert db.scalar("SELECT p.package_type FROM packages_packages p JOIN ml_model_versions v "
                     "ON v.package_id = p.id WHERE v.model_id = :m", m=model.id) == 14
    assert recorded(db, "model-versions/create") >= \
        {("ml_model_versions", "insert"), ("ml_candidates", "insert"), ("packages_packages", "insert")}
    mine = db.rows("SELECT table_name, row_id, model_id FROM toolkit.mlflow_writes "
                   "WHERE endpoint = 'model-versions/create'")
    assert {r.model_id for r in mine} == {model.id}
    assert ("ml_candidates", run.id) in {(r.table_name, r.row_id) for r in mine}


def test_between_milestone_4_dropping_the_triggers_and_the_column_a_model_and_version_need_none(db, who):
    """Milestone 4 drops milestone 2's and 3's transition triggers in a transaction of its own,
    before ``ml_candidates.experiment_id`` and ``ml_experiments``: writes in between still meet
    stage MODELS. A model made then gets its display_name, and a version's run its model_id,
    from the write itself, or milestone 3 no longer verifies (a model without display_name)
    and milestone 4's next run is refused."""
    saved = db.rows("""
        SELECT pg_get_functiondef(t.tgfoid) AS function, pg_get_triggerdef(t.oid) AS trigger
        FROM pg_trigger t WHERE t.tgname IN ('trigger_ml_models_display_name_transition',
                                             'trigger_ml_candidates_model_id_transition')""")
    assert len(saved) == 2
    with db.engine.begin() as conn:  # as drop-legacy's first statement does
        for table, trigger in TRANSITION_TRIGGERS:
            conn.execute(sa.text(f"DROP TRIGGER {trigger} ON {table}; DROP FUNCTION {trigger}()"))
    try:
        status, answer, stage = write(db, who, "registered-models/create", name="Between.Drops")
        assert (status, stage) == (200, Stage.MODELS), answer
        [model] = model_row(db, who, "Between.Drops")
        assert model.display_name == "Between.Drops"
        status, answer, _ = write(db, who, "model-versions/create", name="Between.Drops")
        assert status == 200, answer
        [run] = db.rows("SELECT c.* FROM ml_candidates c JOIN ml_model_versions v "
                        "ON v.id = c.model_version_id WHERE v.model_id = :m", m=model.id)
        assert run.model_id == model.id and run.experiment_id is not None
    finally:
        with db.engine.begin() as conn:
            for row in saved:
                conn.execute(sa.text(row.function))
                conn.execute(sa.text(row.trigger))
    verified = toolkit(db, "verify", "milestone-3")  # (with the triggers back)
    assert verified.exit_code == 0, verified.output


def test_stage_archive_after_milestone_4_makes_the_model_and_keeps_its_default_experiment_id(db, who):
    _project, user = who
    # Milestone 4's gate accepts the default experiment of the model made above: it has
    # its model, and no tags its model lacks
    result = toolkit(db, "migrate", "milestone-4", "--yes")
    assert result.exit_code == 0, result.output
    experiments = db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments")
    status, answer, stage = write(db, who, "registered-models/create", name="after-m4", description="d")
    assert stage is Stage.ARCHIVE
    assert status == 200, answer
    assert answer["registered_model"]["name"] == "after-m4"
    [model] = model_row(db, who, "after-m4")
    assert (model.display_name, model.user_id) == ("after-m4", user)
    # its default experiment kept as an id, where the earlier models' are (the rollback rebuilds it)
    kept = db.rows("SELECT a.name, a.model_id, k.iid FROM toolkit.m4_archive_ml_experiments a "
                   "JOIN toolkit.mlflow_experiment_ids k ON k.id = a.id WHERE a.model_id = :m", m=model.id)
    assert [(r.name, r.model_id) for r in kept] == [("[model]after-m4", model.id)]
    assert db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments") == experiments + 1
    status, answer, _ = write(db, who, "model-versions/create", name="after-m4")
    assert status == 200, answer
    [run] = db.rows("SELECT c.* FROM ml_candidates c JOIN ml_model_versions v ON v.id = c.model_version_id "
                    "WHERE v.model_id = :m", m=model.id)
    assert (run.model_id, str(run.eid)) == (model.id, answer["model_version"]["run_id"])
    assert "experiment_id" not in run._fields
    assert write(db, who, "registered-models/create", name="after-m4")[:2] == EXISTS
    assert write(db, who, "registered-models/delete", name="after-m4")[:2] == (200, {})
    assert model_row(db, who, "after-m4") == []
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE id = :c", c=run.id) == 0
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM toolkit.mlflow_writes WHERE endpoint = "
                                    "'registered-models/delete' AND table_name = 'ml_candidates' AND row_id = :c"),
                            {"c": run.id}).scalar_one() == 1


def test_after_milestone_4_a_deleted_model_takes_its_archived_experiment_and_rollback_still_runs(db, who):
    """A model made before milestone 4 has its default experiment in milestone 4's archive
    and its MLflow experiment id kept: deleting the model removes them too, so rolling
    milestone 4 back does not rebuild an experiment of a model that is gone."""
    [model] = model_row(db, who, "Fraud.Detector_2")
    archived = db.scalar("SELECT id FROM toolkit.m4_archive_ml_experiments WHERE model_id = :m", m=model.id)
    assert archived is not None
    assert db.scalar("SELECT count(*) FROM toolkit.mlflow_experiment_ids WHERE model_id = :m", m=model.id) == 1
    assert write(db, who, "registered-models/delete", name="Fraud.Detector_2")[:2] == (200, {})
    assert db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments WHERE model_id = :m", m=model.id) == 0
    assert db.scalar("SELECT count(*) FROM toolkit.mlflow_experiment_ids WHERE model_id = :m", m=model.id) == 0
    assert ("toolkit.m4_archive_ml_experiments", "delete") in recorded(db, "registered-models/delete")
    result = toolkit(db, "rollback", "milestone-4")
    # The experiments are rebuilt from the archive without the deleted model's; the
    # rollback's proof accepts the delete, recorded in toolkit.mlflow_writes, and says so
    assert result.exit_code == 0, result.output
    assert "written by MLflow clients through toolkit mlflow serve since the baseline" in result.output
    assert "forget-archive: the rebuilt tables match the archive" in result.output
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE id = :e", e=archived) == 0
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NOT NULL "
                     "AND model_id NOT IN (SELECT id FROM ml_models)") == 0


def test_after_the_archive_drop_the_model_is_made_alone_and_deleted_with_its_kept_id(db, who):
    """Stage KEPT_IDS: milestone 4 again, then `toolkit archive drop`."""
    _, user = who
    for args in (("migrate", "milestone-4", "--yes"), ("archive", "drop", "--yes")):
        result = toolkit(db, *args)
        assert result.exit_code == 0, result.output
    status, answer, stage = write(db, who, "registered-models/create", name="kept-ids",
                                  tags=[{"key": "a", "value": "b"}])
    assert stage is Stage.KEPT_IDS
    assert status == 200, answer
    [model] = model_row(db, who, "kept-ids")
    assert (model.display_name, model.user_id) == ("kept-ids", user)
    status, answer, _ = write(db, who, "model-versions/create", name="kept-ids")
    assert status == 200 and answer["model_version"]["aliases"] == ["1.0.0"]
    assert db.scalar("SELECT model_id FROM ml_candidates WHERE eid = CAST(:e AS uuid)",
                     e=answer["model_version"]["run_id"]) == model.id
    # a model that stands for an experiment: its kept MLflow experiment id goes with it
    standing = db.rows("SELECT k.model_id, m.name FROM toolkit.mlflow_experiment_ids k "
                       "JOIN ml_models m ON m.id = k.model_id WHERE k.project_id = :p ORDER BY k.model_id LIMIT 1",
                       p=who[0])[0]
    assert write(db, who, "registered-models/delete", name=standing.name)[:2] == (200, {})
    assert db.scalar("SELECT count(*) FROM toolkit.mlflow_experiment_ids WHERE model_id = :m",
                     m=standing.model_id) == 0
    assert ("toolkit.mlflow_experiment_ids", "delete") in recorded(db, "registered-models/delete")


def test_concurrent_creates_of_one_name_and_versions_of_one_model(db, who):
    """Two writes at once, each in its own READ COMMITTED transaction: one model of the
    name, the other answered as GitLab answers a taken name; versions of one model
    numbered one after the other."""
    project, user = who
    results: dict[str, tuple[int, Any]] = {}

    def racing(endpoint: str, params: dict, key: str, started: threading.Event) -> None:
        with db.engine.connect() as conn, conn.begin() as tx:
            ctx = WriteContext(project, user, stage_of(conn), BASE, endpoint)
            started.set()
            try:
                results[key] = (200, WRITES[endpoint](conn, ctx, params))
            except ApiError as exc:
                tx.rollback()
                results[key] = (exc.status, exc.document())

    for endpoint, params in (("registered-models/create", {"name": "raced"}),
                             ("model-versions/create", {"name": "raced"})):
        with db.engine.connect() as conn, conn.begin():
            ctx = WriteContext(project, user, stage_of(conn), BASE, endpoint)
            first = WRITES[endpoint](conn, ctx, dict(params))
            started = threading.Event()
            second = threading.Thread(target=racing, args=(endpoint, dict(params), endpoint, started))
            second.start()
            started.wait(10)
            time.sleep(0.3)  # the second write is now waiting on the first's locks
            assert second.is_alive(), results
        second.join(30)
        if endpoint == "registered-models/create":
            assert first["registered_model"]["name"] == "raced"
            assert results[endpoint] == EXISTS
        else:
            assert first["model_version"]["aliases"] == ["1.0.0"]
            assert results[endpoint][0] == 200 and results[endpoint][1]["model_version"]["aliases"] == ["2.0.0"]
    assert len(model_row(db, who, "raced")) == 1


def test_the_mlflow_client_parses_every_answer(db, who):
    """What the client (mlflow-skinny 3.17.2) does with a 200: ``call_endpoint`` parses the
    JSON into the endpoint's Response proto (``parse_dict``), the client makes its entity
    from it. Each answer goes through exactly that."""
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel
    from mlflow.protos import model_registry_pb2 as pb
    from mlflow.utils.proto_json_utils import parse_dict

    def parsed(endpoint: str, response: Any, **params: Any) -> Any:
        status, answer, _ = write(db, who, endpoint, **params)
        assert status == 200, answer
        message = response()
        parse_dict(js_dict=answer, message=message)
        return message

    tags = [{"key": "stage", "value": "dev"}]
    model = RegisteredModel.from_proto(parsed("registered-models/create", pb.CreateRegisteredModel.Response,
                                              name="parsed", description="d", tags=tags).registered_model)
    assert (model.name, model.description, model.tags) == ("parsed", "d", {"stage": "dev"})
    model = RegisteredModel.from_proto(parsed("registered-models/update", pb.UpdateRegisteredModel.Response,
                                              name="parsed", description="e").registered_model)
    assert model.description == "e"
    version = ModelVersion.from_proto(parsed("model-versions/create", pb.CreateModelVersion.Response,
                                             name="parsed", tags=tags).model_version)
    assert (version.name, version.aliases, version.tags, version.status) == ("parsed", ["1.0.0"], {"stage": "dev"},
                                                                             "READY")
    version = ModelVersion.from_proto(parsed("model-versions/update", pb.UpdateModelVersion.Response,
                                             name="parsed", version="1.0.0", description="f").model_version)
    assert version.description == "f"
    model = RegisteredModel.from_proto(parsed("registered-models/update", pb.UpdateRegisteredModel.Response,
                                              name="parsed", description="g").registered_model)
    assert [v.version for v in model.latest_versions] == [version.version]
    assert parsed("registered-models/delete", pb.DeleteRegisteredModel.Response, name="parsed") == \
        pb.DeleteRegisteredModel.Response()
