"""The execution engine, exercised through milestone 1 and through small test-only steps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from helpers import TALLY, OnePassStep, own_schema_exists, snapshot, toolkit, toolkit_json, toolkit_process

from toolkit import milestones as registry
from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV
from toolkit.engine.inspection import Inspector
from toolkit.engine.plan import Milestone
from toolkit.engine.results import StepPlan
from toolkit.engine.step import Step
from toolkit.errors import ExitCode

LEDGER_SQL = "SELECT package_id, previous_package_type FROM toolkit.m1_converted_packages ORDER BY 1"


class WritesDuringPlan(Step):
    name = "writes-during-plan"
    description = "a faulty step that tries to write while planning"

    def plan(self, conn):
        conn.execute(sa.text("UPDATE packages_packages SET package_type = 14 WHERE package_type = 7"))
        conn.execute(sa.text("CREATE SCHEMA toolkit"))
        return StepPlan(step=self.name, description=self.description, rows=0)


@pytest.fixture
def with_test_milestone_2(monkeypatch):
    touch_nothing = OnePassStep("touch-nothing", "ml_candidates", "SELECT 0")
    m2 = Milestone(name="milestone-2", title="test-only milestone", steps=(touch_nothing,), reads=("ml_candidates",))
    monkeypatch.setitem(registry.MILESTONES, "milestone-2", m2)
    return m2


def test_dry_run_is_read_only_even_when_a_step_tries_to_write(realistic_db):
    before = snapshot(realistic_db)
    faulty = Milestone(name="milestone-1", title="faulty", steps=(WritesDuringPlan(),), reads=("packages_packages",))
    with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
        Inspector(realistic_db.engine, registry.plan()).plan(faulty)
    assert snapshot(realistic_db) == before
    assert not own_schema_exists(realistic_db)
    with Inspector(realistic_db.engine, registry.plan()).read_only() as conn:
        assert conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
        assert conn.execute(sa.text("SHOW transaction_isolation")).scalar() == "repeatable read"


def test_dry_run_on_a_database_the_toolkit_never_touched_creates_nothing(adversarial_db):
    before = snapshot(adversarial_db)
    schemas = adversarial_db.scalar("SELECT array_agg(nspname ORDER BY nspname) FROM pg_namespace")
    for args in (["plan"], ["migrate", "milestone-1", "--dry-run"], ["status"], ["verify", "milestone-1"],
                 ["history"]):
        result = toolkit(adversarial_db, *args)
        assert result.exit_code in (0, ExitCode.VERIFY_FAILED), result.output
    assert snapshot(adversarial_db) == before
    assert adversarial_db.scalar("SELECT array_agg(nspname ORDER BY nspname) FROM pg_namespace") == schemas
    dry = toolkit(adversarial_db, "migrate", "milestone-1", "--dry-run")
    assert "Dry run: nothing was written." in dry.output
    assert "UPDATE packages_packages p SET package_type = 14" in dry.output


def test_killed_run_resumes_to_the_same_end_state_as_an_uninterrupted_one(make_database):
    killed, clean = make_database("realistic:small"), make_database("realistic:small")
    # batches walk the candidates that have a package, 5 at a time
    walked = [r[0] for r in killed.rows("SELECT id FROM ml_candidates WHERE package_id IS NOT NULL ORDER BY id")]
    died = toolkit_process(killed, "migrate", "milestone-1", "--batch-size", "5",
                           env={FAULT_KILL_AFTER_BATCHES_ENV: "3"})
    assert died.returncode == -signal.SIGKILL
    checkpoint = killed.rows("SELECT last_key, batches_done, completed_at FROM toolkit.checkpoints")
    assert checkpoint == [(walked[14], 3, None)]
    checkpoint_rows = killed.scalar("SELECT rows_done FROM toolkit.checkpoints")
    assert killed.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") > 0
    assert killed.scalar("SELECT outcome FROM toolkit.runs") == "running"  # died without a word
    history = toolkit(killed, "history")
    assert "stopped unrecorded" in history.output and "run the same command again" in history.output

    resumed = toolkit_process(killed, "migrate", "milestone-1", "--batch-size", "5")
    assert resumed.returncode == 0, resumed.stderr
    # the run that resumed it recorded how the killed one ended: at its last commit, 15 rows in
    outcome, ended, last, rows = killed.rows(
        "SELECT outcome, finished_at, last_batch_at, rows_by_step FROM toolkit.runs ORDER BY id")[0]
    assert outcome == "stopped unrecorded" and ended == last and sum(rows.values()) == checkpoint_rows
    # 3 batches before the kill + the rest after: none done twice, none skipped
    assert killed.scalar("SELECT batches_done FROM toolkit.checkpoints") == -(-len(walked) // 5)
    assert killed.scalar("SELECT sum(rows_done) FROM toolkit.checkpoints") == \
        killed.scalar("SELECT count(*) FROM toolkit.m1_converted_packages")
    assert toolkit_process(clean, "migrate", "milestone-1", "--batch-size", "5").returncode == 0

    tables = ("packages_packages", "packages_package_files", "ml_candidates")
    assert snapshot(killed, tables) == snapshot(clean, tables)
    assert killed.rows(LEDGER_SQL) == clean.rows(LEDGER_SQL)


def test_ctrl_c_stops_at_a_batch_boundary_and_the_next_run_resumes(realistic_db):
    process = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "--database-url", realistic_db.url_text, "migrate",
         "milestone-1", "--batch-size", "10", "--pause-ms", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if realistic_db.scalar("SELECT to_regclass('toolkit.checkpoints') IS NOT NULL") and \
                (realistic_db.scalar("SELECT max(batches_done) FROM toolkit.checkpoints") or 0) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    TALLY["runs interrupted with SIGINT (Ctrl-C)"] += 1
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    done = realistic_db.scalar("SELECT batches_done FROM toolkit.checkpoints")
    assert 2 <= done < 25
    assert realistic_db.scalar("SELECT outcome FROM toolkit.runs") == "interrupted"
    assert realistic_db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == \
        realistic_db.scalar("SELECT rows_done FROM toolkit.checkpoints")

    assert toolkit(realistic_db, "migrate", "milestone-1", "--batch-size", "10").exit_code == 0
    assert toolkit(realistic_db, "verify", "milestone-1").exit_code == 0


def test_a_held_table_lock_is_retried_then_fails_cleanly_with_nothing_half_done(realistic_db):
    before = snapshot(realistic_db, ("packages_packages",))
    holder = realistic_db.engine.connect()
    holder.execute(sa.text("SET application_name = 'gitlab-puma'"))
    holder.execute(sa.text("LOCK TABLE packages_packages IN ACCESS EXCLUSIVE MODE"))
    holder_pid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    try:
        result = toolkit(realistic_db, "migrate", "milestone-1", "--lock-timeout-ms", "100",
                         "--retries", "2")
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == ExitCode.LOCKED
    assert "lock timeout in 3 tries" in result.output
    assert f"pid {holder_pid} (gitlab-puma" in result.output
    assert result.output.count("retry") == 2
    assert snapshot(realistic_db, ("packages_packages",)) == before
    assert realistic_db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == 0
    assert realistic_db.scalar("SELECT outcome FROM toolkit.runs") == "failed"
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0


def test_a_read_behind_an_access_exclusive_lock_fails_instead_of_hanging(realistic_db):
    holder = realistic_db.engine.connect()
    holder.execute(sa.text("LOCK TABLE ml_candidates IN ACCESS EXCLUSIVE MODE"))
    try:
        started = time.monotonic()
        result = toolkit(realistic_db, "plan", "milestone-1")
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == ExitCode.LOCKED
    assert "could not be had in time" in result.output
    assert elapsed < 30


def test_a_second_runner_is_refused_and_told_who_holds_the_lock(realistic_db):
    rival = realistic_db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    rival.execute(sa.text("SET application_name = 'toolkit migrate milestone-1'"))
    rival.execute(sa.text("SELECT pg_advisory_lock(1953196404, 1)"))
    rival_pid = rival.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    try:
        result = toolkit(realistic_db, "migrate", "milestone-1", "--lock-wait", "0.3")
        rolled = toolkit(realistic_db, "rollback", "milestone-1", "--lock-wait", "0")
    finally:
        rival.close()
    assert result.exit_code == ExitCode.BUSY  # not a batch's lock timeout (4): busy, try later
    lines = [line for line in result.output.splitlines() if not line.startswith("Using ")]
    assert lines[0].startswith("warning: the runner lock is held by toolkit migrate milestone-1, connected as")
    assert "waiting up to 0.3 s" in lines[0]  # said before the wait, not after it
    assert f"(its server pid {rival_pid})" in lines[-1]
    assert f"pg_terminate_backend({rival_pid})" in lines[-1] and "never run two at once" in lines[-1]
    assert rolled.exit_code == ExitCode.BUSY
    assert not own_schema_exists(realistic_db)  # refused before anything was written


def test_gate_refuses_a_milestone_until_the_previous_one_verifies(adversarial_db, with_test_milestone_2):
    code, doc = toolkit_json(adversarial_db, "migrate", "milestone-2")
    assert code == ExitCode.REFUSED
    assert "milestone-1 does not verify" in doc["error"]["problem"]
    # the check that failed is named, not only its detail ("3 have none" alone does not say of what)
    first = doc["error"]["details"]["failures"][0]
    assert f"does not verify ({first['name']}: {first['detail']})" in doc["error"]["problem"]
    assert "toolkit verify milestone-1" in doc["error"]["next_step"]
    dry = toolkit(adversarial_db, "migrate", "milestone-2", "--dry-run")
    assert dry.exit_code == ExitCode.REFUSED and "gate: CLOSED" in dry.output
    assert not own_schema_exists(adversarial_db)


def test_gate_opens_once_the_previous_milestone_verifies(realistic_db, with_test_milestone_2):
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    result = toolkit(realistic_db, "migrate", "milestone-2")
    assert result.exit_code == 0, result.output
    refused = toolkit(realistic_db, "rollback", "milestone-1")
    assert refused.exit_code == ExitCode.REFUSED
    assert "toolkit rollback milestone-2" in refused.output
    assert toolkit(realistic_db, "rollback", "milestone-2").exit_code == 0
    assert toolkit(realistic_db, "rollback", "milestone-1").exit_code == 0


def test_history_records_who_ran_what_and_how_it_ended(realistic_db):
    toolkit(realistic_db, "migrate", "milestone-1", "--batch-size", "100")
    toolkit(realistic_db, "verify", "milestone-1")  # read-only: not recorded
    toolkit(realistic_db, "rollback", "milestone-1")
    runs = realistic_db.rows("SELECT command, milestone, outcome, database_user, os_user, host, "
                             "rows_by_step, finished_at >= started_at, options FROM toolkit.runs ORDER BY id")
    assert [r[0] for r in runs] == ["toolkit migrate milestone-1 --batch-size=100", "toolkit rollback milestone-1"]
    converted = runs[0][6]["convert-candidate-packages"]
    assert converted > 0 and runs[1][6]["convert-candidate-packages:revert"] == converted
    for _command, milestone, outcome, db_user, os_user, host, _rows, ordered, options in runs:
        assert (milestone, outcome, ordered) == ("milestone-1", "succeeded", True)
        assert db_user == realistic_db.scalar("SELECT current_user") and os_user and host
        assert options["batch_size"] in (100, 1000)
    assert "postgresql://" not in str(runs)
    history = toolkit_json(realistic_db, "history")[1]["result"]["runs"]
    assert [h["outcome"] for h in history] == ["succeeded", "succeeded"]
    assert all(h["finished_at"] >= h["started_at"] for h in history)


def test_max_batches_does_part_of_the_work_and_status_shows_the_checkpoint(realistic_db):
    walked = [r[0] for r in realistic_db.rows(
        "SELECT id FROM ml_candidates WHERE package_id IS NOT NULL ORDER BY id")]
    code, doc = toolkit_json(realistic_db, "migrate", "milestone-1", "--batch-size", "5", "--max-batches", "2")
    assert code == 0
    assert doc["result"]["complete"] is False and doc["result"]["stopped"] == "max-batches"
    status = toolkit_json(realistic_db, "status")[1]["result"]["milestones"][0]
    assert status["state"] == "in_progress"
    assert status["checkpoints"][0]["last_key"] == walked[9] and status["checkpoints"][0]["batches_done"] == 2
    assert status["remaining"]["convert-candidate-packages"] > 0
    assert f"after key {walked[9]}" in toolkit(realistic_db, "status").output
    code, doc = toolkit_json(realistic_db, "migrate", "milestone-1", "--batch-size", "5")
    assert code == 0 and doc["result"]["complete"] is True
    status = toolkit_json(realistic_db, "status")[1]["result"]["milestones"][0]
    assert status["state"] == "verified" and status["remaining"]["convert-candidate-packages"] == 0


def test_json_documents_have_the_documented_shape(adversarial_db):
    code, plan = toolkit_json(adversarial_db, "plan", "milestone-1")
    assert code == 0
    assert set(plan) == {"command", "ok", "exit_code", "database", "result"}
    assert plan["database"].startswith("postgresql://") and f"/{adversarial_db.name}?" in plan["database"]
    milestone = plan["result"]["milestones"][0]
    assert set(milestone) == {"milestone", "title", "rows", "gate", "steps"}
    step = milestone["steps"][0]
    assert set(step) == {"step", "kind", "description", "rows", "breakdown", "context", "anomalies", "sql"}
    assert set(step["anomalies"][0]) == {"kind", "title", "blocking", "count", "resolution", "rows"}

    code, applied = toolkit_json(adversarial_db, "migrate", "milestone-1")
    assert code == ExitCode.VERIFY_FAILED and applied["ok"] is False
    assert set(applied) == {"command", "ok", "exit_code", "database", "error"}
    assert set(applied["error"]) == {"kind", "problem", "next_step", "details"}
    assert applied["error"]["kind"] == "VerificationFailed"


def test_usage_errors_exit_2(realistic_db):
    assert toolkit(realistic_db, "migrate", "milestone-9").exit_code == ExitCode.USAGE
    assert toolkit(realistic_db, "migrate", "milestone-1", "--batch-size", "0").exit_code == ExitCode.USAGE
    assert toolkit(realistic_db, "frobnicate").exit_code == ExitCode.USAGE


def test_a_pass_ends_at_the_largest_key_it_saw_when_it_started(realistic_db):
    """The application may insert faster than batches go; a pass must still end."""
    db = realistic_db
    top = db.scalar("SELECT max(id) FROM ml_candidates")
    assert toolkit(db, "migrate", "milestone-1", "--batch-size", "20", "--max-batches", "1").exit_code == 0
    assert db.scalar("SELECT upper_key FROM toolkit.checkpoints") == top
    db.execute("""
        WITH pkg AS (INSERT INTO packages_packages (project_id, created_at, updated_at, name, version, package_type)
                     SELECT project_id, now(), now(), 'ml_experiment_' || iid, '777', 7
                     FROM ml_experiments WHERE model_id IS NULL ORDER BY id LIMIT 1 RETURNING id, project_id)
        INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid, project_id, package_id)
        SELECT now(), now(), e.id, gen_random_uuid(), pkg.project_id, pkg.id
        FROM pkg JOIN ml_experiments e ON e.project_id = pkg.project_id AND e.model_id IS NULL
        ORDER BY e.id LIMIT 1""")
    resumed = toolkit(db, "migrate", "milestone-1", "--batch-size", "20")
    assert resumed.exit_code == ExitCode.VERIFY_FAILED  # the resumed pass stops at its bound...
    assert "1 not_yet_converted" in resumed.output  # ...and verify sees the newcomer
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0  # a new pass takes it
    assert db.scalar("SELECT upper_key FROM toolkit.checkpoints") == top + 1


def test_a_schema_change_behind_a_lock_is_retried_then_fails_cleanly(realistic_db):
    db = realistic_db
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    # An open transaction that wrote a candidate: reads go on, ALTER TABLE must wait for it.
    holder = db.engine.connect()
    holder.execute(sa.text("SET application_name = 'gitlab-sidekiq'"))
    holder.execute(sa.text("UPDATE ml_candidates SET updated_at = updated_at WHERE id = (SELECT min(id) FROM ml_candidates)"))
    try:
        result = toolkit(db, "migrate", "milestone-2", "--ddl-lock-timeout-ms", "50", "--ddl-retries", "2")
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == ExitCode.LOCKED, result.output
    assert "add-model-id-column: lock timeout in 3 tries" in result.output
    assert "gitlab-sidekiq" in result.output
    assert db.scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = 'ml_candidates' "
                     "AND column_name = 'model_id'") == 0
    assert toolkit(db, "migrate", "milestone-2").exit_code == 0


def test_max_runtime_stops_at_a_batch_boundary(realistic_db):
    code, doc = toolkit_json(realistic_db, "migrate", "milestone-1", "--batch-size", "5", "--pause-ms", "100",
                             "--max-runtime", "0.5")
    assert code == 0
    assert doc["result"]["complete"] is False and doc["result"]["stopped"] == "max-runtime"
    done = realistic_db.scalar("SELECT batches_done FROM toolkit.checkpoints")
    assert 1 <= done < 49
    assert realistic_db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == \
        realistic_db.scalar("SELECT rows_done FROM toolkit.checkpoints")
    assert toolkit_json(realistic_db, "migrate", "milestone-1")[1]["result"]["complete"] is True


def test_a_check_counts_every_row_and_lists_only_the_first(realistic_db, monkeypatch):
    """A failing check on a big database names a thousand rows, not a million (memory stays flat)."""
    from toolkit.engine import listing

    db = realistic_db
    monkeypatch.setattr(listing, "LISTED_ROWS", 5)
    assert toolkit(db, "migrate", "milestone-1", "--batch-size", "3", "--max-batches", "1").exit_code == 0
    left = [r[0] for r in db.rows("""SELECT p.id FROM packages_packages p WHERE p.package_type = 7
        AND EXISTS (SELECT 1 FROM ml_candidates c WHERE c.package_id = p.id) ORDER BY p.id""")]
    assert len(left) > 12  # more than the limit, and more than a terminal shows
    code, doc = toolkit_json(db, "verify", "milestone-1")
    assert code == ExitCode.VERIFY_FAILED
    check = doc["error"]["details"]["result"]["milestones"][0]["checks"][0]
    assert check["count"] == len(left) and f"{len(left)} remain: {len(left)} not_yet_converted" in check["detail"]
    assert [r["package_id"] for r in check["rows"]] == left[:5]
    shown = toolkit(db, "verify", "milestone-1").output
    assert f"and {len(left) - 5} more (--json lists the first 5)" in shown


def test_bare_verify_checks_only_what_was_applied_and_says_not_started_for_the_rest(realistic_db):
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    result = toolkit(realistic_db, "verify")
    assert result.exit_code == 0, result.output
    assert "milestone-1: verifies" in result.output
    for later in ("milestone-2", "milestone-3", "milestone-4"):
        assert f"{later}: not started (not checked)" in result.output
    assert "[FAIL]" not in result.output
    code, doc = toolkit_json(realistic_db, "verify")
    assert code == 0
    assert [(m["milestone"], m["ok"]) for m in doc["result"]["milestones"]] == [
        ("milestone-1", True), ("milestone-2", None), ("milestone-3", None), ("milestone-4", None)]
    # a milestone rolled back is not checked either; one named explicitly always is
    assert toolkit(realistic_db, "rollback", "milestone-1").exit_code == 0
    again = toolkit(realistic_db, "verify")
    assert again.exit_code == 0 and "milestone-1: rolled back (not checked)" in again.output
    assert toolkit(realistic_db, "verify", "milestone-1").exit_code == 1


def test_migrate_and_rollback_say_how_long_each_step_and_the_run_took(realistic_db):
    code, doc = toolkit_json(realistic_db, "migrate", "milestone-1", "--batch-size", "5")
    assert code == 0
    result = doc["result"]
    assert set(result["timings"]) == {"fingerprint", "apply", "verify"}
    assert all(took > 0 for took in result["timings"].values())
    assert result["seconds"] == pytest.approx(sum(result["timings"].values()), abs=0.01)
    assert result["timings"]["apply"] == pytest.approx(sum(p["seconds"] for p in result["passes"]), abs=0.01)
    assert all(p["seconds"] > 0 for p in result["passes"])
    undone = toolkit(realistic_db, "rollback", "milestone-1", "--batch-size", "5")
    assert undone.exit_code == 0
    lines = undone.output.splitlines()
    passes = [line for line in lines if line.startswith("  ") and not line.startswith("  [")]
    assert passes and all(line.rstrip().endswith(" s)") for line in passes), undone.output
    assert " rows restored in " in passes[0] and " batches" in passes[0]
    closing = next(line for line in lines if line.startswith("milestone-1: "))
    assert " rows and 0 schema changes in " in closing
    assert " s (apply " in closing and ", checks " in closing


def test_off_a_terminal_a_long_pass_prints_a_progress_line_every_few_seconds(make_database):
    db, quiet = make_database("realistic:small"), make_database("realistic:small")
    every = {"TOOLKIT_PROGRESS_EVERY_S": "0.3"}
    run = toolkit_process(db, "--json", "migrate", "milestone-1", "--batch-size", "2", "--pause-ms", "60", env=every)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"] is True  # stdout keeps its one document
    lines = [line for line in run.stderr.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 2, run.stderr
    total = db.scalar("SELECT count(*) FROM ml_candidates WHERE package_id IS NOT NULL")
    done = [int(line.split(f" of {total} keys")[0].rsplit(" ", 1)[1].replace(",", "")) for line in lines]
    assert done == sorted(done) and 0 < done[0] < total
    assert all(f" of {total} keys scanned (" in line and " rows changed, " in line and " keys/s, " in line
               and (line.endswith(" s left") or line.endswith("time left not yet estimated"))
               for line in lines)
    silent = toolkit_process(quiet, "-q", "migrate", "milestone-1", "--batch-size", "2", "--pause-ms", "60", env=every)
    assert silent.returncode == 0 and "progress: " not in silent.stderr
