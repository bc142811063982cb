"""``--hooks-dir``: executables called at a run's milestones, on a real database. A failing
on-start stops the run before it writes anything; a failing on-before-drop stops milestone
4 with nothing dropped, and the rerun (held, let go by its own on-held hook through
``toolkit control unpostpone``, told on-control, then on-before-drop) ends as a run never
stopped; on-status and on-throttled tell a run that waits; a hook sees the run's
numbers and never the password; a hook past --hooks-timeout is killed; a hooks directory
that is not usable is a usage error before anything connects.

What a hook saw is what it wrote to a file; nothing here reads the clock.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from helpers import differences, end_state, snapshot, toolkit, toolkit_process

from toolkit.errors import ExitCode

OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"
ML_TABLES = ("ml_experiments", "ml_experiment_metadata", "ml_candidates")
DUMP = 'env > "$HOOK_OUT/$TOOLKIT_HOOK_EVENT.env"\n'
PHASE_DUMP = 'env > "$HOOK_OUT/$TOOLKIT_HOOK_EVENT-$TOOLKIT_HOOK_PHASE.env"\n'


def hooks_dir(tmp_path: Path, **scripts: str) -> Path:
    """A directory of hooks, each ``name=body`` a shell script (``on_start`` is on-start)."""
    directory = tmp_path / "hooks"
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        hook = directory / name.replace("_", "-")
        hook.write_text("#!/bin/sh\n" + body)
        hook.chmod(0o755)
    return directory


def env_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def runs(db) -> int:
    if not db.scalar("SELECT to_regclass('toolkit.runs') IS NOT NULL"):
        return 0
    return db.scalar("SELECT count(*) FROM toolkit.runs")


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_a_failing_on_start_stops_the_run_before_it_writes_anything(realistic_db, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    hooks = hooks_dir(tmp_path, on_start=DUMP + 'echo "outside the change window" >&2\nexit 3\n',
                      on_failure=DUMP)
    before, recorded = snapshot(realistic_db), runs(realistic_db)
    result = toolkit(realistic_db, "migrate", "milestone-1", "--hooks-dir", str(hooks),
                     env={"HOOK_OUT": str(out)})
    assert result.exit_code == ExitCode.THROTTLED == 6, result.output
    [error] = error_lines(result.output)
    assert "hook on-start vetoed the run (exit code 3: outside the change window)" in error, error
    assert "nothing was written" in error and "Applying" not in result.output
    assert snapshot(realistic_db) == before and runs(realistic_db) == recorded
    state = realistic_db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-1'") \
        if realistic_db.scalar("SELECT to_regclass('toolkit.milestones') IS NOT NULL") else None
    assert state in (None, "not_started")
    failed = env_of(out / "on-failure.env")  # told how it ended: resumable
    assert failed["TOOLKIT_HOOK_EXIT_CODE"] == "6" and failed["TOOLKIT_HOOK_RESUMABLE"] == "1"
    assert "on-start vetoed" in failed["TOOLKIT_HOOK_ERROR"]

    (hooks / "on-start").unlink()  # the veto lifted: the same command runs
    (hooks / "on-success").write_text("#!/bin/sh\n" + DUMP)
    (hooks / "on-success").chmod(0o755)
    monkeypatch.chdir(tmp_path)  # given relative to where the command runs (a hook runs in DIR)
    again = toolkit(realistic_db, "migrate", "milestone-1", "--hooks-dir", "hooks",
                    env={"HOOK_OUT": str(out)})
    assert again.exit_code == 0, again.output
    assert env_of(out / "on-success.env")["TOOLKIT_HOOK_EXIT_CODE"] == "0"


def test_a_failing_on_before_drop_drops_nothing_and_the_rerun_ends_as_a_twin(before_milestone, tmp_path):
    db, twin = before_milestone(4), before_milestone(4)
    assert toolkit(twin, "migrate", "milestone-4", "--yes").exit_code == 0
    vetoing = hooks_dir(tmp_path, on_before_drop='echo "no fresh backup" >&2\nexit 1\n')
    result = toolkit(db, "migrate", "milestone-4", "--yes", "--hooks-dir", str(vetoing))
    assert result.exit_code == 6, result.output
    [error] = error_lines(result.output)
    assert "hook on-before-drop vetoed the run (exit code 1: no fresh backup)" in error, error
    for table in ML_TABLES:  # archived and checked, nothing dropped
        assert db.scalar(f"SELECT to_regclass('{table}') IS NOT NULL"), table
    assert db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments") == \
        db.scalar("SELECT count(*) FROM ml_experiments") > 0
    assert db.scalar("SELECT outcome FROM toolkit.runs ORDER BY id DESC LIMIT 1") == "vetoed"
    assert db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-4'") == "in_progress"

    # the rerun holds again; its on-held hook lets it go on with `toolkit control unpostpone`
    log = tmp_path / "hooks.log"
    said = 'echo "$TOOLKIT_HOOK_EVENT $TOOLKIT_HOOK_CONTROL_ACTION $TOOLKIT_HOOK_CONTROL_REASON" >> "$LOG"\n'
    allowing = hooks_dir(tmp_path / "allowing", on_before_drop=said, on_control=said, on_held=said
                         + '"$PYTHON" -m toolkit --database-url "$HOOK_DB" control unpostpone '
                           '--reason "hook said so"\n')
    again = toolkit(db, "migrate", "milestone-4", "--yes", "--hold-before-drop", "--hooks-dir",
                    str(allowing), env={"LOG": str(log), "PYTHON": sys.executable, "HOOK_DB": db.url_text})
    assert again.exit_code == 0, again.output
    assert log.read_text().splitlines() == ["on-held  ", "on-control unpostpone hook said so",
                                            "on-before-drop  "]
    assert db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-4'") == "verified"
    assert differences(end_state(db), end_state(twin)) == []


def test_a_hook_sees_the_runs_numbers_and_never_the_password(realistic_db, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    hooks = hooks_dir(tmp_path, on_start=DUMP, on_phase=PHASE_DUMP + "exit 1\n", on_success=DUMP)
    events = tmp_path / "run.jsonl"
    password = "hook-must-not-see-this"  # the test server trusts its socket: any password works
    url = realistic_db.url.set(password=password).render_as_string(hide_password=False)
    result = toolkit_process(realistic_db, "migrate", "milestone-1", "--batch-size", "5",
                             "--hooks-dir", str(hooks), "--events", str(events),
                             env={"HOOK_OUT": str(out), "PGPASSWORD": password,
                                  "TOOLKIT_DATABASE_URL": url.replace("+psycopg", "")})
    assert result.returncode == 0, result.stderr
    # on-phase failed each time: a warning, not a stop
    assert result.stderr.count("hook on-phase failed (exit code 1); the run goes on") == 3

    said = {path.name: env_of(path) for path in out.iterdir()}
    assert set(said) == {"on-start.env", "on-phase-fingerprint.env", "on-phase-apply.env",
                         "on-phase-verify.env", "on-success.env"}
    for name, env in said.items():
        assert password not in "".join(f"{k}={v}" for k, v in env.items()), name
        assert "PGPASSWORD" not in env and "TOOLKIT_DATABASE_URL" not in env, name
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    run_id = next(e["run_id"] for e in lines if e["event"] == "run_start")
    rows = sum(e["rows"] for e in lines if e["event"] == "batch")
    start, done = said["on-start.env"], said["on-success.env"]
    common = {"TOOLKIT_HOOK_COMMAND": "migrate", "TOOLKIT_HOOK_MILESTONE": "milestone-1",
              "TOOLKIT_HOOK_DATABASE": realistic_db.url.database, "TOOLKIT_HOOK_RUN": lines[0]["run"]}
    assert start | common == start and done | common == done
    assert start["TOOLKIT_HOOK_EVENT"] == "on-start" and start["TOOLKIT_HOOK_RUN_ID"] == ""
    assert start["TOOLKIT_HOOK_ROWS_DONE"] == "0" and start["TOOLKIT_HOOK_PHASE"] == ""
    assert said["on-phase-apply.env"]["TOOLKIT_HOOK_RUN_ID"] == str(run_id)
    assert done["TOOLKIT_HOOK_EVENT"] == "on-success" and done["TOOLKIT_HOOK_EXIT_CODE"] == "0"
    assert done["TOOLKIT_HOOK_RUN_ID"] == str(run_id) and done["TOOLKIT_HOOK_PHASE"] == "verify"
    history = realistic_db.scalar("SELECT rows_by_step FROM toolkit.runs WHERE id = :id", id=run_id)
    assert int(done["TOOLKIT_HOOK_ROWS_DONE"]) == rows == sum(history.values()) > 0
    assert done["TOOLKIT_HOOK_KEYS_DONE"] == done["TOOLKIT_HOOK_KEYS_TOTAL"]
    assert done["TOOLKIT_HOOK_PROGRESS"] == "100.0" and done["TOOLKIT_HOOK_ETA_SECONDS"] == "0"
    assert float(done["TOOLKIT_HOOK_RATE"]) > 0 and done["TOOLKIT_HOOK_THROTTLED_SECONDS"] == "0.0"
    documented = OPERATIONS.read_text().split("# Hooks", 1)[1].split("\n# ", 1)[0]
    for name in {k for env in said.values() for k in env if k.startswith("TOOLKIT_HOOK_")}:
        assert f"`{name}`" in documented, name


def test_on_status_and_on_throttled_tell_a_run_that_waits(realistic_db, tmp_path):
    """The run waits on a flag file until on-status, called every 0.3 s, finds it waiting
    and removes the file."""
    out, flag = tmp_path / "out", tmp_path / "hold"
    out.mkdir()
    flag.touch()
    hooks = hooks_dir(tmp_path, on_throttled=DUMP, on_status='[ "$TOOLKIT_HOOK_THROTTLED" = 1 ] || exit 0\n'
                                                            + DUMP + 'rm -f "$FLAG"\n')
    result = toolkit(realistic_db, "migrate", "milestone-1", "--hooks-dir", str(hooks),
                     "--hooks-status-every", "0.005", "--throttle-flag-file", str(flag),
                     env={"HOOK_OUT": str(out), "FLAG": str(flag)})
    assert result.exit_code == 0, result.output
    throttled = env_of(out / "on-throttled.env")
    assert throttled["TOOLKIT_HOOK_SIGNALS"] == "flag_file" and throttled["TOOLKIT_HOOK_THROTTLED"] == "1"
    status = env_of(out / "on-status.env")
    assert status["TOOLKIT_HOOK_EVENT"] == "on-status" and status["TOOLKIT_HOOK_PHASE"] == "apply"
    assert float(status["TOOLKIT_HOOK_THROTTLED_SECONDS"]) > 0
    assert not flag.exists()


def test_a_hook_past_its_time_is_killed_and_vetoes(realistic_db, tmp_path):
    child = tmp_path / "child.pid"
    hooks = hooks_dir(tmp_path, on_start=f'sleep 600 &\necho $! > "{child}"\nwait\n')
    before = snapshot(realistic_db)
    result = toolkit(realistic_db, "migrate", "milestone-1", "--hooks-dir", str(hooks),
                     "--hooks-timeout", "1")
    assert result.exit_code == 6, result.output
    [error] = error_lines(result.output)
    assert "hook on-start vetoed the run (did not end within --hooks-timeout 1 s and was killed)" in error
    assert snapshot(realistic_db) == before
    pid = int(child.read_text())
    for _ in range(100):  # the sleep the hook started is killed with it (its process group)
        if not Path(f"/proc/{pid}").exists() or "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the hook's child {pid} is still running")


def test_an_unusable_hooks_directory_is_a_usage_error_before_anything_connects(realistic_db, tmp_path):
    before, recorded = snapshot(realistic_db), runs(realistic_db)
    missing = toolkit(realistic_db, "migrate", "milestone-1", "--hooks-dir", str(tmp_path / "none"))
    assert missing.exit_code == 2 and "is not a directory" in missing.output, missing.output
    plain = hooks_dir(tmp_path, on_start="exit 0\n")
    os.chmod(plain / "on-start", 0o644)
    not_executable = toolkit(realistic_db, "rollback", "milestone-1", "--hooks-dir", str(plain))
    assert not_executable.exit_code == 2, not_executable.output
    assert "on-start is not an executable file" in not_executable.output
    os.chmod(plain / "on-start", 0o755)
    (plain / "on-sucess").write_text("#!/bin/sh\n")
    typo = toolkit(realistic_db, "migrate", "milestone-1", "--hooks-dir", str(plain))
    assert typo.exit_code == 2 and "on-sucess is named like a hook" in typo.output, typo.output
    for result in (missing, not_executable, typo):
        assert len(error_lines(result.output)) == 1 and "Using the database" not in result.output
    assert snapshot(realistic_db) == before and runs(realistic_db) == recorded
