"""The toolkit's schema dropped (or its milestones table) while GitLab's tables show the
milestones' changes: every command names the state, what is in place and what can no
longer be rolled back, and refuses (exit 3) with nothing written, until the schema is
restored or `toolkit adopt --yes` declares what is in place."""

from __future__ import annotations

import json

from faults import newest_run_id, start_toolkit, wait_for_batches
from helpers import snapshot, toolkit

COMMANDS = (("status",), ("plan",), ("plan", "milestone-3"), ("migrate", "milestone-3", "--yes"),
            ("migrate", "milestone-4", "--yes"), ("rollback", "milestone-4"), ("verify",),
            ("verify", "milestone-2"), ("migrate", "milestone-4", "--dry-run"))
# GitLab's ML tables that milestone 4 keeps
KEPT = ("packages_packages", "packages_package_files", "ml_candidates", "ml_models", "ml_model_metadata",
        "ml_candidate_params", "ml_candidate_metrics")


def _schema_there(db) -> bool:
    return db.scalar("SELECT to_regnamespace('toolkit') IS NOT NULL")


def _one_error_line(done) -> str:
    assert "Traceback" not in done.output
    errors = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.output
    return errors[0]


def test_a_dropped_toolkit_schema_after_milestone_4_is_named_by_every_command(before_milestone):
    db = before_milestone(5)  # milestones 1 to 4 applied
    db.execute("DROP SCHEMA toolkit CASCADE")
    before = snapshot(db, KEPT)
    for command in COMMANDS:
        done = toolkit(db, *command)
        assert done.exit_code == 3, (command, done.output)
        line = _one_error_line(done)
        assert line.startswith("error: The toolkit's ledger is lost: the schema toolkit is gone, but "
                               "GitLab's tables show changes of milestone-2, milestone-3 and milestone-4 "
                               "in place: milestone-2 (ml_candidates.model_id exists); milestone-3 "
                               "(ml_models.display_name exists); milestone-4 (ml_experiments is gone, "
                               "ml_experiment_metadata is gone, ml_candidates.experiment_id is gone)"), line
        assert "milestone-2, milestone-3 and milestone-4 can no longer be rolled back" in line, line
        assert "Next: restore the toolkit schema from a backup" in line, line
        assert "`toolkit adopt --yes`" in line, line
        assert not _schema_there(db), (command, "nothing written, not even the toolkit's schema")
    assert snapshot(db, KEPT) == before

    code_json = toolkit(db, "--json", "status")
    doc = json.loads(code_json.stdout)
    assert doc["exit_code"] == 3 and doc["error"]["details"]["in_place"]["milestone-4"][0] == "ml_experiments is gone"

    # declaring it: first without --yes (refused, nothing written), then with it
    done = toolkit(db, "adopt")
    assert done.exit_code == 3, done.output
    assert "would record milestone-2, milestone-3 and milestone-4 as applied, for good" in _one_error_line(done)
    assert not _schema_there(db)
    done = toolkit(db, "adopt", "--yes")
    assert done.exit_code == 0, done.output
    assert "Recorded milestone-2, milestone-3 and milestone-4 as applied" in done.output

    done = toolkit(db, "--json", "status")
    assert done.exit_code == 0, done.output
    states = {m["milestone"]: m["state"] for m in json.loads(done.stdout)["result"]["milestones"]}
    assert states == {"milestone-1": "not started", "milestone-2": "applied", "milestone-3": "applied",
                      "milestone-4": "applied"}, states
    for milestone in ("milestone-4", "milestone-3", "milestone-2"):
        done = toolkit(db, "rollback", milestone)
        assert done.exit_code == 3, done.output
        line = _one_error_line(done)
        assert "its ledger was lost and run 1 (`toolkit adopt`" in line, line
        assert "only the toolkit schema restored from a backup" in line, line
    done = toolkit(db, "migrate", "milestone-4", "--yes")
    assert done.exit_code == 0, done.output
    assert "milestone-4 is already applied, and final: its ledger was lost" in done.output
    (adopted,) = [r for r in json.loads(toolkit(db, "--json", "history").stdout)["result"]["runs"]
                  if r["command"] == "toolkit adopt"]
    assert adopted["outcome"] == "succeeded"
    assert adopted["options"]["adopted"]["milestone-2"] == ["ml_candidates.model_id exists"]
    assert snapshot(db, KEPT) == before


def test_a_dropped_milestones_table_is_named_and_adopt_leaves_what_is_left_alone(before_milestone):
    db = before_milestone(4)  # milestones 1 to 3 applied
    db.execute("DROP TABLE toolkit.milestones")
    tables = db.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'toolkit'")
    for command in (("status",), ("migrate", "milestone-4", "--yes"), ("rollback", "milestone-3")):
        done = toolkit(db, *command)
        assert done.exit_code == 3, (command, done.output)
        line = _one_error_line(done)
        assert line.startswith("error: The toolkit's ledger is lost: the table toolkit.milestones is gone, "
                               "but GitLab's tables show changes of milestone-2 and milestone-3 in place"), line
    done = toolkit(db, "adopt", "--yes")
    assert done.exit_code == 3, done.output
    assert "ALTER SCHEMA toolkit RENAME TO toolkit_damaged" in _one_error_line(done)
    assert db.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'toolkit'") == tables


def test_a_run_whose_schema_is_dropped_under_it_says_so(before_milestone, tmp_path):
    """DROP SCHEMA toolkit between two batches of a run: the run stops naming it (exit 3),
    not with a generic database error, and the next command names the lost ledger."""
    db = before_milestone(3)
    prior = newest_run_id(db)
    running = start_toolkit(db, ("migrate", "milestone-3", "--yes", "--batch-size", "4", "--pause-ms", "100"),
                            tmp_path, "dropped")
    wait_for_batches(db, running, prior, 2)
    db.execute("DROP SCHEMA toolkit CASCADE")
    code, stdout, stderr = running.wait()
    assert code == 3, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: The toolkit's own schema, or a table of it, is gone ("), line
    assert "restore the toolkit schema from a backup, or declare the state with `toolkit adopt --yes`" in line
    done = toolkit(db, "status")
    assert done.exit_code == 3 and "the schema toolkit is gone" in done.output, done.output


def test_a_database_the_toolkit_never_touched_is_not_taken_for_a_lost_ledger(legacy_db, empty_db):
    assert toolkit(legacy_db, "status").exit_code == 0
    done = toolkit(legacy_db, "adopt", "--yes")
    assert done.exit_code == 3 and "Nothing to adopt" in _one_error_line(done), done.output
    done = toolkit(empty_db, "status")
    assert done.exit_code == 3 and "ledger" not in done.output, done.output
