"""Experiment writes after milestone 4, through ``toolkit mlflow serve --allow-writes`` with
the real MLflow client (3.x): ``ml_experiments`` is gone, every experiment is its model.

- ``set_experiment_tag``: the tag on the experiment's model (``ml_model_metadata``) and, at
  the archive, in its ``ml_experiment_metadata`` rows, so ``get_experiment`` shows it, verify
  accepts it (recorded), and ``rollback milestone-4`` gives it back to the rebuilt
  experiment; a tag set twice is GitLab's 400; after ``toolkit archive drop`` the model's
  metadata alone;
- ``delete_experiment``: GitLab's own rule, 400 "Cannot delete an experiment associated to
  a model" (every experiment has one), nothing deleted;
- ``set_experiment`` of a new name then tagging it: the experiment made after milestone 4
  shows its tags at the archive and after the rollback.

One database walked forward: milestone 4, rollback, milestone 4 again, ``archive drop``;
then two sessions: a tag set at the archive and milestone 4's rollback do not interleave.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from helpers import toolkit, toolkit_process
from mlflow_serving import client, raw, said, serving
from test_mlflow_stages import _waiting_on

from toolkit.mlflow_api.stages import Stage, StageChanged, WriteContext, stage_of
from toolkit.mlflow_api.tracking_writes import WRITES
from toolkit.mlflow_api.walk import client_version

pytestmark = pytest.mark.skipif(client_version() is None,
                                reason="the MLflow client is not installed: pip install -e '.[test]'")
ARCHIVE_METADATA = "toolkit.m4_archive_ml_experiment_metadata"
TAGGED = "set-experiment-tag"
ASSOCIATED = "Cannot delete an experiment associated to a model"


def ok(db, *args: str) -> str:
    result = toolkit(db, *args)
    assert result.exit_code == 0, result.output
    return result.output


def model_tags(db, model: int) -> dict[str, str]:
    return {r.name: r.value for r in db.rows("SELECT name, value FROM ml_model_metadata WHERE model_id = :m", m=model)}


def recorded(db, table: str) -> set[tuple[int, int]]:
    """(row_id, model_id) of what experiments/set-experiment-tag recorded in ``table``."""
    return {(r.row_id, r.model_id) for r in db.rows(
        "SELECT row_id, model_id FROM toolkit.mlflow_writes WHERE endpoint = 'experiments/set-experiment-tag' "
        "AND table_name = :t AND action = 'insert'", t=table)}


TAG_TWICE_AND_DELETE = """
def refused(call):
    try:
        call()
    except MlflowException as exc:
        return [exc.get_http_status_code(), exc.error_code, exc.message]
    return None
"""


def test_experiment_tags_and_deletes_after_milestone_4_the_rollback_and_the_archive_drop(before_milestone):
    db = before_milestone(4)
    ok(db, "migrate", "milestone-4", "--yes")
    old = db.rows("""SELECT x.project_id, x.iid, x.id, x.model_id FROM toolkit.m4_archive_ml_experiments x
                     WHERE x.deleted_on IS NULL AND x.model_id IS NOT NULL ORDER BY x.id LIMIT 1""")[0]
    project = old.project_id
    before = model_tags(db, old.model_id)
    archived_tags = db.scalar(f"SELECT count(*) FROM {ARCHIVE_METADATA}")

    # --- at the archive ------------------------------------------------------------------
    with serving(db, "--allow-writes") as server:
        out = said(client(server, project, TAG_TWICE_AND_DELETE + f"""
c.set_experiment_tag("{old.iid}", "{TAGGED}", "at the archive")
say(c.get_experiment("{old.iid}").tags)
say(refused(lambda: c.set_experiment_tag("{old.iid}", "{TAGGED}", "again")))
say(refused(lambda: c.delete_experiment("{old.iid}")))
late = mlflow.set_experiment("made after milestone 4")
c.set_experiment_tag(late.experiment_id, "late", "tag")
say([late.experiment_id, c.get_experiment(late.experiment_id).tags])
say(refused(lambda: c.delete_experiment(late.experiment_id)))
say([c.get_experiment("{old.iid}").lifecycle_stage, c.get_experiment(late.experiment_id).lifecycle_stage])
made = c.create_experiment("made with tags", tags={{"made": "with it"}})
say(c.get_experiment(made).tags)
"""))
    tags, twice, deleted, (late_iid, late_tags), late_deleted, stages, made_tags = out
    assert made_tags == {"made": "with it"}
    assert tags[TAGGED] == "at the archive" and len(tags) == 1 + db.scalar(
        f"SELECT count(*) FROM {ARCHIVE_METADATA} WHERE experiment_id = :e AND name <> :n", e=old.id, n=TAGGED)
    assert twice[:2] == [400, "INVALID_PARAMETER_VALUE"]
    assert f"Validation failed: Name '{TAGGED}' already taken" in twice[2]
    # GitLab's 400 {"message": …} has no error_code: the client raises it as INTERNAL_ERROR
    assert deleted[1] == late_deleted[1] == "INTERNAL_ERROR" and ASSOCIATED in deleted[2] \
        and ASSOCIATED in late_deleted[2]
    assert late_tags == {"late": "tag"} and stages == ["active", "active"]
    with serving(db, "--allow-writes") as server:
        for iid in (old.iid, late_iid):
            assert raw(server, project, "experiments/delete", body={"experiment_id": str(iid)})[:2] == \
                (400, {"message": ASSOCIATED})
    # the tables: the model's metadata and the archive's, each row recorded with its model
    assert model_tags(db, old.model_id) == {**before, TAGGED: "at the archive"}
    late = db.rows("SELECT id, model_id FROM toolkit.m4_archive_ml_experiments WHERE project_id = :p AND iid = :i",
                   p=project, i=int(late_iid))[0]
    assert model_tags(db, late.model_id) == {"late": "tag"}
    archived = {(r.experiment_id, r.name): r for r in db.rows(
        f"SELECT id, experiment_id, name, value FROM {ARCHIVE_METADATA} WHERE name IN (:a, 'late')", a=TAGGED)}
    assert {k: r.value for k, r in archived.items()} == {(old.id, TAGGED): "at the archive",
                                                          (late.id, "late"): "tag"}
    assert db.scalar(f"SELECT count(*) FROM {ARCHIVE_METADATA}") == archived_tags + 3
    assert recorded(db, ARCHIVE_METADATA) == {(archived[(old.id, TAGGED)].id, old.model_id),
                                              (archived[(late.id, "late")].id, late.model_id)}
    model_rows = {r.id: r.model_id for r in db.rows(
        "SELECT id, model_id FROM ml_model_metadata WHERE name IN (:a, 'late') AND model_id IN (:o, :l)",
        a=TAGGED, o=old.model_id, l=late.model_id)}
    assert recorded(db, "ml_model_metadata") >= set(model_rows.items()) and len(model_rows) == 2
    # nothing deleted
    assert db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments WHERE id IN (:o, :l)",
                     o=old.id, l=late.id) == 2
    assert db.scalar("SELECT count(*) FROM toolkit.mlflow_writes WHERE endpoint = 'experiments/delete'") == 0
    ok(db, "verify", "milestone-4")

    # --- milestone 4 rolled back: the rebuilt experiments have the tags ----------------------
    ok(db, "rollback", "milestone-4")
    assert {(r.experiment_id, r.name, r.value) for r in db.rows(
        "SELECT experiment_id, name, value FROM ml_experiment_metadata WHERE name IN (:a, 'late')", a=TAGGED)} \
        == {(old.id, TAGGED, "at the archive"), (late.id, "late", "tag")}
    with serving(db, "--allow-writes") as server:
        out = said(client(server, project, f"""
say([c.get_experiment("{old.iid}").tags, c.get_experiment("{late_iid}").tags])
"""))
    assert out[0][0] == tags and out[0][1] == {"late": "tag"}
    assert {(r.name, r.value) for r in db.rows("SELECT t.name, t.value FROM ml_experiment_metadata t JOIN "
                                               "ml_experiments x ON x.id = t.experiment_id WHERE x.name = "
                                               "'made with tags'")} == {("made", "with it")}
    ok(db, "verify")

    # --- milestone 4 again (its gate: the tags are on the models), then the archive dropped ---
    ok(db, "migrate", "milestone-4", "--yes")
    ok(db, "archive", "drop", "--yes")
    with serving(db, "--allow-writes") as server:
        out = said(client(server, project, TAG_TWICE_AND_DELETE + f"""
c.set_experiment_tag("{old.iid}", "kept", "after the archive drop")
say(c.get_experiment("{old.iid}").tags)
say(refused(lambda: c.set_experiment_tag("{old.iid}", "kept", "again")))
say(refused(lambda: c.set_experiment_tag("{old.iid}", "{TAGGED}", "again")))
say(refused(lambda: c.delete_experiment("{late_iid}")))
say(c.get_experiment(c.create_experiment("made after the drop", tags={{"k": "v"}})).tags)
"""))
    kept_tags, twice, twice_older, deleted, made_after_drop = out
    assert made_after_drop == {"k": "v"}
    assert kept_tags == model_tags(db, old.model_id) and kept_tags["kept"] == "after the archive drop"
    assert kept_tags[TAGGED] == "at the archive"
    assert twice[:2] == twice_older[:2] == [400, "INVALID_PARAMETER_VALUE"] and "'kept' already taken" in twice[2]
    assert deleted[1] == "INTERNAL_ERROR" and ASSOCIATED in deleted[2]
    kept_row = db.scalar("SELECT id FROM ml_model_metadata WHERE model_id = :m AND name = 'kept'", m=old.model_id)
    assert (kept_row, old.model_id) in recorded(db, "ml_model_metadata")
    assert db.scalar("SELECT count(*) FROM toolkit.mlflow_experiment_ids WHERE id IN (:o, :l)",
                     o=old.id, l=late.id) == 2
    ok(db, "verify", "milestone-4")


def test_a_tag_set_at_the_archive_and_the_rebuild_do_not_interleave(before_milestone):
    """Two sessions: set-experiment-tag at the archive, uncommitted, holds its lock (SHARE
    ROW EXCLUSIVE on the archive); ``rollback milestone-4`` waits for it, then rebuilds the
    experiment with the tag. The other order: the write waits for the rebuild's lock and,
    once the tables are back, finds the stage changed and writes nothing."""
    db = before_milestone(4)
    ok(db, "migrate", "milestone-4", "--yes")
    old = db.rows("SELECT project_id, iid, id, model_id FROM toolkit.m4_archive_ml_experiments "
                  "WHERE model_id IS NOT NULL ORDER BY id LIMIT 1")[0]
    with db.engine.connect() as conn:
        conn.begin()
        ctx = WriteContext(old.project_id, None, stage_of(conn), "http://x", "experiments/set-experiment-tag")
        assert ctx.stage is Stage.ARCHIVE
        assert WRITES[ctx.endpoint](conn, ctx, {"experiment_id": str(old.iid), "key": "in flight",
                                                "value": "v"}) == {}
        results: list = []
        rollback = threading.Thread(target=lambda: results.append(toolkit_process(db, "rollback", "milestone-4")))
        rollback.start()
        _waiting_on(db, "toolkit.m4_archive_ml_experiments")
        conn.commit()
    rollback.join(300)
    assert results[0].returncode == 0, results[0].stderr
    assert db.scalar("SELECT value FROM ml_experiment_metadata WHERE experiment_id = :e AND name = 'in flight'",
                     e=old.id) == "v"

    ok(db, "migrate", "milestone-4", "--yes")
    outcome: list = []

    def write() -> None:
        with db.engine.connect() as conn, conn.begin():
            ctx = WriteContext(old.project_id, None, stage_of(conn), "http://x", "experiments/set-experiment-tag")
            try:
                WRITES[ctx.endpoint](conn, ctx, {"experiment_id": str(old.iid), "key": "waited", "value": "v"})
                outcome.append("written")
            except StageChanged as changed:
                outcome.append(changed)

    with db.engine.connect() as rebuild:
        rebuild.begin()
        rebuild.execute(sa.text(f"LOCK TABLE toolkit.m4_archive_ml_experiments, {ARCHIVE_METADATA} IN SHARE MODE"))
        writer = threading.Thread(target=write)
        writer.start()
        _waiting_on(db, "toolkit.m4_archive_ml_experiments")
        rebuild.execute(sa.text("CREATE TABLE ml_experiments (LIKE toolkit.m4_archive_ml_experiments)"))
        rebuild.commit()
    writer.join(60)
    assert isinstance(outcome[0], StageChanged), outcome
    assert db.scalar("SELECT count(*) FROM ml_model_metadata WHERE name = 'waited'") == 0
    assert db.scalar(f"SELECT count(*) FROM {ARCHIVE_METADATA} WHERE name = 'waited'") == 0


def test_both_rollbacks_leave_the_tag_where_gitlab_before_the_blueprint_keeps_it(before_milestone):
    """A tag set after milestone 4 on the default experiment of a model GitLab made (a
    model milestone 3's rollback keeps): milestone 4's rollback gives the tag back to the
    experiment, milestone 3's removes the model's copy (in its ledger, as its own copies),
    and verify passes after each."""
    db = before_milestone(4)
    ok(db, "migrate", "milestone-4", "--yes")
    old = db.rows("""SELECT x.project_id, x.iid, x.id, x.model_id FROM toolkit.m4_archive_ml_experiments x
                     WHERE x.model_id NOT IN (SELECT model_id FROM toolkit.m3_created_models)
                     ORDER BY x.id LIMIT 1""")[0]
    with db.engine.connect() as conn, conn.begin():
        ctx = WriteContext(old.project_id, None, stage_of(conn), "http://x", "experiments/set-experiment-tag")
        assert WRITES[ctx.endpoint](conn, ctx, {"experiment_id": str(old.iid), "key": "both", "value": "v"}) == {}
    ok(db, "rollback", "milestone-4")
    ok(db, "verify")
    assert model_tags(db, old.model_id)["both"] == "v"
    ok(db, "rollback", "milestone-3")
    assert db.scalar("SELECT value FROM ml_experiment_metadata WHERE experiment_id = :e AND name = 'both'",
                     e=old.id) == "v"
    assert db.scalar("SELECT count(*) FROM ml_models WHERE id = :m", m=old.model_id) == 1  # GitLab's: kept
    assert "both" not in model_tags(db, old.model_id)
    ok(db, "verify")
