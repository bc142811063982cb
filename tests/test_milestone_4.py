"""Milestone 4: confirmation, preconditions, kills at every action, archive status and drop,
order of rollbacks. Its apply, rollback, kill at a batch and concurrent writer are the
contract's (test_contract.py)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

import pytest
from helpers import columns_as_sets, schema_snapshot, snapshot, toolkit, toolkit_json, toolkit_process

from toolkit.engine.batches import FAULT_KILL_AFTER_ACTIONS_ENV
from toolkit.errors import ExitCode

TABLES = ("ml_experiments", "ml_experiment_metadata", "ml_candidates", "ml_models", "ml_model_metadata",
          "ml_candidate_params", "ml_candidate_metrics", "packages_packages")


@pytest.fixture
def ready(before_milestone):
    """``ready()``: a database of the test's own with milestones 1-3 applied (adversarial data)."""
    return lambda: before_milestone(4)


def test_not_null_constraints_come_back_under_their_own_names(ready):
    """PostgreSQL 18 keeps NOT NULL as named constraints in pg_constraint (contype 'n'); a
    database's history can leave them under other names than the default one (a renamed
    column keeps its constraint's name). The rebuild gives each its own name back. Before
    18, NOT NULL is only pg_attribute.attnotnull, which the rebuild keeps as well."""
    db = ready()
    if int(db.scalar("SHOW server_version_num")) >= 180000:
        db.execute("ALTER TABLE ml_experiments RENAME CONSTRAINT ml_experiments_name_not_null TO "
                   "ml_experiments_name_given")
        db.execute("ALTER TABLE ml_candidates RENAME CONSTRAINT ml_candidates_experiment_id_not_null TO "
                   "ml_candidates_experiment_given")
    schema_before = schema_snapshot(db)
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    result = toolkit(db, "rollback", "milestone-4")
    assert result.exit_code == 0, result.output
    assert columns_as_sets(schema_snapshot(db)) == columns_as_sets(schema_before)


def test_refused_without_confirmation(ready):
    db = ready()
    result = toolkit(db, "migrate", "milestone-4")
    assert result.exit_code == ExitCode.REFUSED
    assert "needs confirmation" in result.output and "--yes" in result.output
    assert db.scalar("SELECT to_regclass('toolkit.m4_archived_ddl') IS NULL "
                     "OR NOT EXISTS (SELECT 1 FROM toolkit.m4_archived_ddl)")


def _typed_at_the_prompt(db, typed: str) -> tuple[int, str]:
    """``migrate milestone-4`` in a terminal (a pseudo-terminal on stdin), answering ``typed``."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "TOOLKIT_DATABASE_URL": db.url_text}
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "migrate", "milestone-4"], env=env,
                               stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    os.close(secondary)
    try:
        os.write(primary, typed.encode() + b"\n")
        output, _ = process.communicate(timeout=120)
    finally:
        os.close(primary)
    return process.returncode, output


def test_typing_the_database_name_at_the_prompt_confirms_and_anything_else_refuses(ready):
    db = ready()
    before = snapshot(db, TABLES)
    code, output = _typed_at_the_prompt(db, "gitlabhq_production")
    assert code == ExitCode.REFUSED, output
    assert f"DROPS tables in '{db.name}'" in output and "the name typed is not the database's" in output
    experiments = db.scalar("SELECT count(*) FROM ml_experiments")
    listed = output[:output.index("Type the database name")]  # shown before it asks
    assert f"ml_experiments rows: {experiments}" in listed, output
    assert "ml_experiment_metadata rows: " in listed and "candidate experiment_ids: " in listed
    assert snapshot(db, TABLES) == before
    assert db.scalar("SELECT to_regclass('ml_experiments') IS NOT NULL")

    code, output = _typed_at_the_prompt(db, db.name)
    assert code == 0, output
    assert db.scalar("SELECT to_regclass('ml_experiments') IS NULL")


def test_a_run_that_would_be_refused_does_not_ask_for_confirmation(ready):
    db = ready()
    db.execute("UPDATE ml_candidates SET model_id = NULL WHERE id = (SELECT min(id) FROM ml_candidates)")
    code, output = _typed_at_the_prompt(db, db.name)
    assert code == ExitCode.REFUSED, output
    assert "does not verify" in output and "Type the database name" not in output
    assert db.scalar("SELECT to_regclass('ml_experiments') IS NOT NULL")


@pytest.mark.parametrize(("change", "expected"), [
    ("INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name) "
     "SELECT now(), now(), 999, min(id), 'late arrival' FROM projects",
     "milestone-3 does not verify"),
    ("UPDATE ml_experiment_metadata SET value = 'changed', updated_at = now() "
     "WHERE id = (SELECT min(id) FROM ml_experiment_metadata)",
     "every experiment has its model and its tags"),
    ("UPDATE ml_candidates SET model_id = NULL WHERE id = (SELECT min(id) FROM ml_candidates)",
     "does not verify"),
    ("WITH p AS (INSERT INTO packages_packages (project_id, created_at, updated_at, name, version, package_type) "
     "SELECT project_id, now(), now(), 'late', '1', 7 FROM ml_candidates ORDER BY id LIMIT 1 RETURNING id) "
     "UPDATE ml_candidates SET package_id = (SELECT id FROM p) WHERE id = (SELECT min(id) FROM ml_candidates)",
     "milestone-1 verifies"),
])
def test_refused_under_each_failed_precondition_with_nothing_changed(ready, change, expected):
    db = ready()
    db.execute(change)
    before = snapshot(db, TABLES)
    result = toolkit(db, "migrate", "milestone-4", "--yes")
    assert result.exit_code == ExitCode.REFUSED, result.output
    assert expected in result.output
    assert snapshot(db, TABLES) == before
    assert db.scalar("SELECT to_regclass('ml_experiments') IS NOT NULL")


def test_a_kill_at_every_action_then_a_rerun_completes_with_nothing_lost(ready):
    clean = ready()
    assert toolkit(clean, "migrate", "milestone-4", "--yes").exit_code == 0
    expected = snapshot(clean, ("ml_candidates", "ml_models", "ml_model_metadata", "packages_packages"))
    archive = ("toolkit.m4_archive_ml_experiments", "toolkit.m4_archive_ml_experiment_metadata",
               "toolkit.m4_archive_candidate_experiments")
    expected_archive = snapshot(clean, archive)
    actions = 15
    for kill_after in range(1, actions):
        db = ready()
        died = toolkit_process(db, "migrate", "milestone-4", "--yes",
                               env={FAULT_KILL_AFTER_ACTIONS_ENV: str(kill_after)})
        assert died.returncode == -9, (kill_after, died.stderr)
        finished = toolkit_process(db, "migrate", "milestone-4", "--yes")
        assert finished.returncode == 0, (kill_after, finished.stderr)
        assert snapshot(db, ("ml_candidates", "ml_models", "ml_model_metadata", "packages_packages")) == expected
        assert snapshot(db, archive) == expected_archive, kill_after


def test_a_rollback_killed_at_every_action_completes_on_rerun(ready, make_database):
    original = ready()
    schema_before, data_before = schema_snapshot(original), snapshot(original, TABLES)
    applied = make_database(like=original)
    assert toolkit(applied, "migrate", "milestone-4", "--yes").exit_code == 0
    for kill_after in (1, 3, 5, 7, 9, 11, 13, 15):
        db = make_database(like=applied)
        died = toolkit_process(db, "rollback", "milestone-4", env={FAULT_KILL_AFTER_ACTIONS_ENV: str(kill_after)})
        assert died.returncode == -9, (kill_after, died.stderr)
        finished = toolkit_process(db, "rollback", "milestone-4")
        assert finished.returncode == 0, (kill_after, finished.stderr)
        assert columns_as_sets(schema_snapshot(db)) == columns_as_sets(schema_before), kill_after
        assert snapshot(db, TABLES) == data_before, kill_after


def test_archive_status_and_drop(ready):
    db = ready()
    assert toolkit(db, "archive", "drop", "--yes").exit_code == ExitCode.REFUSED  # milestone 4 not applied
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    code, doc = toolkit_json(db, "archive", "status")
    assert code == 0
    tables = doc["result"]["tables"]
    assert tables["toolkit.m4_archive_ml_experiments"] > 0
    assert doc["result"]["mapping_sample"][0].keys() >= {"mlflow_experiment_id", "model_id", "name"}
    refused = toolkit(db, "archive", "drop")
    assert refused.exit_code == ExitCode.REFUSED and "--yes" in refused.output
    assert toolkit(db, "archive", "drop", "--yes").exit_code == 0
    assert db.scalar("SELECT to_regclass('toolkit.m4_archive_ml_experiments') IS NULL")
    assert db.scalar("SELECT count(*) FROM toolkit.m4_archive_candidate_experiments") == 0
    # every milestone still verifies; rollback of milestone 4 is now refused
    assert toolkit(db, "verify").exit_code == 0
    assert "absent" in toolkit(db, "archive", "status").output


def test_an_interrupted_rollback_says_rolling_back_and_the_archive_cannot_be_dropped_meanwhile(ready):
    db = ready()
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    archived = db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments")

    # a rollback under way, in another process: archive drop must not run beside it
    rolling = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "--database-url", db.url_text, "rollback", "milestone-4",
         "--batch-size", "2", "--pause-ms", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-4'") != "rolling_back":
        assert time.monotonic() < deadline, "the rollback did not start"
        time.sleep(0.02)
    dropped = toolkit(db, "archive", "drop", "--yes")
    assert dropped.exit_code in (ExitCode.REFUSED, ExitCode.BUSY), dropped.output
    assert "rolling back" in dropped.output or "runner lock" in dropped.output
    during = toolkit(db, "status")
    _, stderr = rolling.communicate(timeout=120)
    assert rolling.returncode == 0, stderr
    assert "rolling back" in during.output
    assert db.scalar("SELECT count(*) FROM toolkit.runs WHERE command LIKE 'toolkit archive drop%'") == 0

    # interrupted part-way (one batch): status says so, and what is left; drop still refused
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    partial = toolkit(db, "rollback", "milestone-4", "--batch-size", "2", "--max-batches", "1")
    assert partial.exit_code == 0 and "Stopped early (max-batches)" in partial.output, partial.output
    _, doc = toolkit_json(db, "status")
    m4 = next(m for m in doc["result"]["milestones"] if m["milestone"] == "milestone-4")
    assert m4["state"] == "rolling_back"
    assert m4["left_to_undo"], m4
    shown = toolkit(db, "status").output
    assert "milestone-4 is rolling back" in shown and "toolkit rollback milestone-4" in shown
    refused = toolkit(db, "archive", "drop", "--yes")
    assert refused.exit_code == ExitCode.REFUSED and "rolling back" in refused.output
    assert db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments") == archived
    assert toolkit(db, "rollback", "milestone-4").exit_code == 0
    assert toolkit_json(db, "status")[1]["result"]["milestones"][3]["state"] == "rolled_back"


def test_going_back_across_milestone_4_is_refused_in_order_before_any_other_check(ready):
    db = ready()
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    before = snapshot(db, ("ml_candidates", "ml_models", "packages_packages"))
    for args, said in ((("rollback", "milestone-3"), "milestone-3 cannot be rolled back while milestone-4 is applied"),
                       (("rollback", "milestone-2"), "milestone-2 cannot be rolled back while milestone-3 and "
                                                     "milestone-4 are applied"),
                       (("migrate", "milestone-2"), "milestone-2 cannot be migrated again while milestone-4 is applied"),
                       (("migrate", "milestone-3"), "milestone-3 cannot be migrated again while milestone-4 is applied")):
        result = toolkit(db, *args)
        assert result.exit_code == ExitCode.REFUSED, (args, result.output)
        assert said in result.output, result.output
        assert "toolkit rollback milestone-4" in result.output
        assert "does not exist" not in result.output
    assert snapshot(db, ("ml_candidates", "ml_models", "packages_packages")) == before


def test_status_and_plan_give_milestone_4_the_same_count(ready):
    db = ready()

    def counted() -> tuple[int, int, int]:
        _, status = toolkit_json(db, "status")
        m4 = next(m for m in status["result"]["milestones"] if m["milestone"] == "milestone-4")
        _, plan = toolkit_json(db, "plan", "milestone-4")
        return sum(m4["remaining"].values()), m4["schema_changes_left"], plan["result"]["milestones"][0]["rows"]

    rows, schema, planned = counted()
    total = db.scalar("SELECT (SELECT count(*) FROM ml_experiments) + (SELECT count(*) FROM ml_experiment_metadata)"
                      " + (SELECT count(*) FROM ml_candidates)")
    # the schema changes migrate reports: archive tables and sync triggers, the 4 of
    # model_id NOT NULL and its index, the transition triggers, the column and 2 tables
    assert rows == planned == total > 0 and schema == 10
    shown = toolkit(db, "status").output
    assert next(line for line in shown.splitlines() if line.startswith("milestone-4")).split()[3:5] == [str(total), "10"]
    code, applied = toolkit_json(db, "migrate", "milestone-4", "--yes")
    assert code == 0 and sum(p["schema_change"] and p["changed"] for p in applied["result"]["passes"]) == 10
    assert counted() == (0, 0, 0)


def test_checks_and_records_say_what_they_found_not_that_the_schema_changed(ready):
    db = ready()
    applied = toolkit(db, "migrate", "milestone-4", "--yes").output
    assert "  check-archive: the archive matches the source row for row (" in applied
    assert "  capture-ddl: recorded the DDL of the tables" in applied
    assert "check-archive: schema changed" not in applied and "capture-ddl: schema changed" not in applied
    undone = toolkit(db, "rollback", "milestone-4").output
    assert "  forget-archive: the rebuilt tables match the archive; archive cleared (" in undone


def test_going_back_while_milestone_4_is_half_rolled_back_says_so(ready):
    db = ready()
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    assert toolkit(db, "rollback", "milestone-4", "--batch-size", "2", "--max-batches", "1").exit_code == 0
    result = toolkit(db, "rollback", "milestone-3")
    assert result.exit_code == ExitCode.REFUSED
    assert "milestone-3 cannot be rolled back while milestone-4 is being rolled back" in result.output
    assert "toolkit rollback milestone-4" in result.output
