"""``toolkit status`` of a running run, read from another process through the database only:
its pass, keys done of total, rate and time left, last batch, waits, pause and control
history match what the run itself said (its --events file), its checkpoint and its history
row; ``--watch`` refreshes a bounded number of times, or until the run ends; WAL totals per
pass and per run agree between the batch, pass_end and run_end events and history.

The run is milestone 1 on the small realistic data set in batches of 5 keys with a
--pause-ms between them; the exact comparisons are made while it is paused (`toolkit control
pause`), so nothing moves between the reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from faults import Running, start_toolkit
from helpers import toolkit, toolkit_json
from test_control import _end_runs_left as _end_runs_left  # the autouse fixture
from test_control import _started, batches, control_event, lines_of, wait_until

SLOW = ("--batch-size", "5", "--pause-ms", "200")


def _start(db, tmp_path: Path) -> tuple[Running, Path]:
    events = tmp_path / "run.jsonl"
    run = start_toolkit(db, ("migrate", "milestone-1", *SLOW, "--events", str(events)), tmp_path, "run")
    _started.append(run)
    wait_until(run, lambda: len(batches(lines_of(events))) >= 3)
    return run, events


def test_status_of_a_paused_run_matches_its_events_checkpoint_and_history(realistic_db, tmp_path):
    run, events = _start(realistic_db, tmp_path)
    assert toolkit(realistic_db, "control", "pause", "--reason", "a look").exit_code == 0
    wait_until(run, lambda: control_event(events, "pause"))
    said = lines_of(events)
    run_id = next(e["run_id"] for e in said if e["event"] == "run_start")
    started = [e for e in said if e["event"] == "pass_start"][-1]
    mine = [b for b in batches(said) if b["pass_name"] == started["pass_name"]]

    code, doc = toolkit_json(realistic_db, "status")
    assert code == 0
    live = doc["result"]["run"]
    assert live["run_id"] == run_id and live["phase"] == "apply" and live["tracked"]
    assert live["pass_name"] == started["pass_name"] and live["keys_total"] == started["keys"]
    assert live["keys_done"] == sum(b["keys"] for b in mine) > 0
    assert live["pass_rows"] == sum(b["rows"] for b in mine) and live["batches"] == len(mine)
    assert (live["last_batch_keys"], live["last_batch_rows"]) == (mine[-1]["keys"], mine[-1]["rows"])
    assert live["last_batch_ms"] > 0 and live["last_batch_age_s"] >= 0
    # the checkpoint of the pass, and the run's history row, say the same
    done, batches_done = realistic_db.rows(
        "SELECT rows_done, batches_done FROM toolkit.checkpoints WHERE step = :s AND run_id = :r",
        s=started["pass_name"], r=run_id)[0]
    assert (done, batches_done) == (live["pass_rows"], live["batches"])
    history = realistic_db.scalar("SELECT rows_by_step FROM toolkit.runs WHERE id = :r", r=run_id)
    assert live["rows"] == sum(history.values()) == sum(b["rows"] for b in batches(said))
    assert live["wal_bytes"] == sum(b["wal_bytes"] for b in batches(said)) > 0
    # rate over the pass up to its last batch, and the time left at that rate
    assert live["rate_keys_s"] > 0
    assert math.isclose(live["eta_s"], (live["keys_total"] - live["keys_done"]) / live["rate_keys_s"])
    assert 0 <= live["throttled_share"] < 1
    assert [(c["action"], c["reason"]) for c in live["controls"]] == [("pause", "a look")]
    assert doc["result"]["paused"]["reason"] == "a look"

    shown = toolkit(realistic_db, "status")
    assert shown.exit_code == 0, shown.output
    assert f"run {run_id} is going (apply phase for " in shown.output
    assert ": toolkit migrate milestone-1 --batch-size=5" in shown.output
    assert (f"pass {started['pass_name']}: {live['keys_done']} of {live['keys_total']} keys"
            in shown.output)
    assert "left in this pass" in shown.output and "control: pause by" in shown.output
    assert "a look" in shown.output and "throttled 0.0 % of its time" in shown.output

    # --watch with a bound: three showings (the full status, then two refreshes), exit 0
    watched = toolkit(realistic_db, "status", "--watch", "0.1", "--count", "3")
    assert watched.exit_code == 0, watched.output
    assert watched.output.count(f"run {run_id} is going (") == 3
    assert watched.output.count(" UTC --") == 2
    code_lines = toolkit(realistic_db, "status", "--watch", "0.1", "--count", "3", "--json")
    assert code_lines.exit_code == 0, code_lines.output
    frames = [json.loads(line) for line in code_lines.stdout.splitlines()]
    assert [f["result"]["frame"] for f in frames] == [1, 2, 3]
    assert all(f["result"]["run"]["run_id"] == run_id for f in frames)
    assert "milestones" in frames[0]["result"] and frames[-1]["result"]["ended"] is None

    # an unbounded watch in its own process ends by itself when the run ends
    watch = start_toolkit(realistic_db, ("status", "--watch", "0.2"), tmp_path, "watch")
    _started.append(watch)
    wait_until(watch, lambda: " UTC --" in watch.stdout.read_text())
    assert toolkit(realistic_db, "control", "resume").exit_code == 0
    code, _, err = run.wait()
    assert code == 0, err
    code, shown_out, err = watch.wait()
    assert code == 0, err
    assert shown_out.rstrip().endswith(f"run {run_id} ended: succeeded"), shown_out

    # with no run going: said once, exit 0, as status
    idle = toolkit(realistic_db, "status", "--watch", "0.1")
    assert idle.exit_code == 0 and idle.output.rstrip().endswith("No run is going.")
    assert toolkit_json(realistic_db, "status")[1]["result"]["run"] is None


def test_wal_totals_per_pass_and_per_run_agree_in_events_and_history(realistic_db, tmp_path):
    events = tmp_path / "wal.jsonl"
    done = toolkit(realistic_db, "migrate", "milestone-1", "--batch-size", "5", "--events", str(events))
    assert done.exit_code == 0, done.output
    said = lines_of(events)
    by_pass: dict[str, int] = {}
    for b in batches(said):
        by_pass[b["pass_name"]] = by_pass.get(b["pass_name"], 0) + b["wal_bytes"]
    assert by_pass and all(v > 0 for v in by_pass.values())
    ended = {e["pass_name"]: e["wal_bytes"] for e in said if e["event"] == "pass_end"}
    assert {k: v for k, v in ended.items() if v} == by_pass
    run_end = next(e for e in said if e["event"] == "run_end")
    assert run_end["wal_bytes"] == sum(by_pass.values()) and run_end["wal_bytes_by_step"] == by_pass

    code, doc = toolkit_json(realistic_db, "history", "--limit", "1")
    assert code == 0
    (recorded,) = doc["result"]["runs"]
    assert recorded["wal_bytes_by_step"] == by_pass and recorded["wal_bytes"] == sum(by_pass.values())
    listed = toolkit(realistic_db, "history", "--limit", "1")
    header = listed.stdout.splitlines()[0].split()
    assert header[-1] == "WAL"
    assert listed.stdout.splitlines()[2].rstrip().endswith(("B", "kB", "MB"))
