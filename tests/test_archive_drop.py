"""After `toolkit archive drop --yes`, milestone 4 is final, as an operator meets it: the
rollback that would need the archive is refused up front (exit 3, naming the drop's run and
time), `migrate milestone-4` says it is done, `status` never advises a command that cannot
succeed, nothing is recreated, and history holds no database URL."""

from __future__ import annotations

import re

from helpers import toolkit, toolkit_json

from toolkit.errors import ExitCode
from toolkit.timestamps import shown

ARCHIVE_RELATIONS = ("SELECT array_agg(c.relname ORDER BY c.relname) FROM pg_class c "
                     "JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE n.nspname = 'toolkit' AND c.relname IN "
                     "('m4_archive_ml_experiments', 'm4_archive_ml_experiment_metadata')")


def _milestone_4_state(db) -> str:
    return db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-4'")


def test_after_the_archive_drop_milestone_4_is_final_and_every_command_says_so(realistic_db):
    db = realistic_db
    for milestone in ("milestone-1", "milestone-2", "milestone-3", "milestone-4"):
        assert toolkit(db, "migrate", milestone, "--yes").exit_code == 0, milestone
    assert toolkit(db, "archive", "drop", "--yes").exit_code == 0
    drop = db.rows("SELECT id, finished_at FROM toolkit.runs WHERE command = 'toolkit archive drop --yes'")
    assert len(drop) == 1
    drop_id, dropped_at = drop[0]
    runs_before = db.scalar("SELECT max(id) FROM toolkit.runs")
    kept_ids = db.rows("SELECT * FROM toolkit.mlflow_experiment_ids ORDER BY id")
    assert kept_ids

    # the rollback: refused before anything is written, naming the drop and what to do instead
    refused = toolkit(db, "rollback", "milestone-4")
    assert refused.exit_code == ExitCode.REFUSED, refused.output
    said = refused.output
    assert f"its archive was dropped by run {drop_id} at {shown(dropped_at)}" in said, said
    assert "backup" in said and "42P01" not in said and "Report this" not in said, said
    lines = [line for line in said.splitlines() if not line.startswith("Using the database")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Next: " in lines[0], said
    assert _milestone_4_state(db) == "verified"
    assert db.scalar(ARCHIVE_RELATIONS) is None  # nothing recreated
    assert db.scalar("SELECT max(id) FROM toolkit.runs") == runs_before  # refused before a run began
    code, doc = toolkit_json(db, "rollback", "milestone-4")
    assert code == ExitCode.REFUSED and doc["error"]["details"]["archive_dropped_by_run"] == drop_id, doc

    # status: the archive is gone and milestone 4 final; never a rollback that cannot succeed
    shown_status = toolkit(db, "status")
    assert shown_status.exit_code == 0
    assert "rollback milestone-4" not in shown_status.output, shown_status.output
    assert f"archive was dropped by run {drop_id}" in shown_status.output, shown_status.output
    _, status_doc = toolkit_json(db, "status")
    m4 = next(m for m in status_doc["result"]["milestones"] if m["milestone"] == "milestone-4")
    assert m4["state"] == "verified" and m4["final"]["archive_dropped_by_run"] == drop_id, m4

    # migrate again: already done (exit 0), nothing applied, state still verified
    again = toolkit(db, "migrate", "milestone-4", "--yes")
    assert again.exit_code == 0, again.output
    assert "already verified" in again.output and f"run {drop_id}" in again.output, again.output
    assert _milestone_4_state(db) == "verified"
    assert db.scalar(ARCHIVE_RELATIONS) is None
    assert db.scalar("SELECT max(id) FROM toolkit.runs") == runs_before

    # the archive stays gone; the final state stays served; every milestone verifies
    archive = toolkit(db, "archive", "status")
    assert archive.exit_code == 0
    assert re.search(r"toolkit\.m4_archive_ml_experiments\s+absent", archive.output), archive.output
    assert db.rows("SELECT * FROM toolkit.mlflow_experiment_ids ORDER BY id") == kept_ids
    assert toolkit(db, "verify").exit_code == 0
    # history never holds the database URL nor its password
    assert db.scalar("SELECT count(*) FROM toolkit.runs WHERE outcome <> 'succeeded'") == 0
    for (error,) in db.rows("SELECT error FROM toolkit.runs WHERE error IS NOT NULL"):
        assert db.url_text not in error and "postgresql://" not in error, error


def _migrated_and_dropped(db) -> int:
    for milestone in ("milestone-1", "milestone-2", "milestone-3", "milestone-4"):
        assert toolkit(db, "migrate", milestone, "--yes").exit_code == 0, milestone
    assert toolkit(db, "archive", "drop", "--yes").exit_code == 0
    return db.scalar("SELECT id FROM toolkit.runs WHERE command = 'toolkit archive drop --yes'")


def test_going_back_before_a_final_milestone_4_is_refused_without_advising_its_rollback(realistic_db):
    db = realistic_db
    drop_id = _migrated_and_dropped(db)
    for args in (("rollback", "milestone-3"), ("rollback", "milestone-1"), ("migrate", "milestone-2")):
        refused = toolkit(db, *args)
        assert refused.exit_code == ExitCode.REFUSED, (args, refused.output)
        assert f"milestone-4 is final, its archive was dropped by run {drop_id}" in refused.output, refused.output
        assert "rollback milestone-4" not in refused.output, refused.output
    # a second drop has nothing to drop and says by which run it went
    again = toolkit(db, "archive", "drop", "--yes")
    assert again.exit_code == 0 and f"dropped by run {drop_id}" in again.output, again.output
    assert db.scalar("SELECT count(*) FROM toolkit.runs WHERE command LIKE 'toolkit archive drop%'") == 1


def test_a_milestone_4_left_rolling_back_after_the_drop_is_recorded_verified_by_migrate(realistic_db):
    """What an earlier toolkit left after `rollback milestone-4` failed on the dropped archive:
    the state `rolling_back`. Status must not advise the rollback; migrate puts it right."""
    db = realistic_db
    drop_id = _migrated_and_dropped(db)
    db.execute("UPDATE toolkit.milestones SET state = 'rolling_back' WHERE milestone = 'milestone-4'")
    shown_status = toolkit(db, "status").output
    assert "rollback milestone-4" not in shown_status and "left to undo" not in shown_status, shown_status
    assert f"archive was dropped by run {drop_id}" in shown_status
    assert "toolkit migrate milestone-4 --yes" in shown_status, shown_status
    assert toolkit(db, "rollback", "milestone-4").exit_code == ExitCode.REFUSED
    assert _milestone_4_state(db) == "rolling_back"  # the refusal wrote nothing
    fixed = toolkit(db, "migrate", "milestone-4", "--yes")
    assert fixed.exit_code == 0, fixed.output
    assert _milestone_4_state(db) == "verified"
    assert db.scalar(ARCHIVE_RELATIONS) is None
    assert db.scalar("SELECT outcome FROM toolkit.runs ORDER BY id DESC LIMIT 1") == "succeeded"


def test_history_keeps_a_driver_error_as_its_sqlstate_and_first_line_never_a_url(realistic_db):
    """A failure the runner did not foresee is stored as the server said it in one line: not
    SQLAlchemy's text (its statement dump and its link) nor the database's URL."""
    import sqlalchemy as sa
    from sqlalchemy.exc import DBAPIError

    from toolkit.engine.events import LOGGED
    from toolkit.engine.history import RunHistory, error_text
    from toolkit.engine.settings import RunOptions

    db = realistic_db
    try:
        with db.engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM toolkit.m4_archive_ml_experiments"))
    except DBAPIError as exc:
        failure = exc
    said = error_text(failure)
    assert said.startswith("UndefinedTable (42P01): relation \"toolkit.m4_archive_ml_experiments\""), said
    assert "[SQL" not in said and "sqlalche.me" not in said and "\n" not in said, said
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0  # the toolkit's schema and a run
    run_id = db.scalar("SELECT max(id) FROM toolkit.runs")
    RunHistory(db.engine, RunOptions(), LOGGED).record_end(
        run_id, "failed", {}, f"Interrupted: the server closed the connection on {db.url_text}. Next: retry")
    stored = db.scalar("SELECT error FROM toolkit.runs WHERE id = :i", i=run_id)
    assert stored == "Interrupted: the server closed the connection on the database. Next: retry", stored
