"""``--events`` (and ``--metrics-textfile``): what a run tells whoever watches, checked against
what the database says it did (history, checkpoints) on a real migrate and rollback."""

from __future__ import annotations

import itertools
import json
import re
import signal
import textwrap
from pathlib import Path

import yaml
from helpers import toolkit, toolkit_json, toolkit_process
from prometheus_client.parser import text_string_to_metric_families

from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV

OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines_of(path) -> list[dict]:
    """Every line a JSON object, parsed one by one (a partial line fails here)."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def history_rows(db) -> dict[int, int]:
    return {run_id: sum((rows or {}).values())
            for run_id, rows in db.rows("SELECT id, rows_by_step FROM toolkit.runs ORDER BY id")}


def test_events_of_a_migrate_add_up_to_the_rows_it_applied(realistic_db, tmp_path):
    events = tmp_path / "run.jsonl"
    code, doc = toolkit_json(realistic_db, "migrate", "milestone-1", "--batch-size", "5",
                             "--events", str(events))
    assert code == 0, doc
    lines = lines_of(events)
    names = [e["event"] for e in lines]
    assert names[0] == "start" and names[-1] == "end"
    assert lines[-1]["exit_code"] == 0 and lines[-1]["outcome"] == "succeeded"
    assert {"run_start", "phase", "pass_start", "batch", "pass_end", "run_end"} <= set(names)
    assert len({e["run"] for e in lines}) == 1
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
    assert all(ISO_UTC.match(e["time"]) for e in lines)
    assert [e["phase"] for e in lines if e["event"] == "phase"] == ["fingerprint", "apply", "verify"]

    batches = [e for e in lines if e["event"] == "batch"]
    result = doc["result"]
    assert len(batches) == sum(p["batches"] for p in result["passes"]) > 1
    applied = sum(b["rows"] for b in batches)
    assert applied == result["rows"] == history_rows(realistic_db)[result["run_id"]] > 0
    assert applied == realistic_db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages")
    # batches follow one another: each starts where the last ended, and took keys of its own
    for one, two in itertools.pairwise(batches):
        if one["pass_name"] == two["pass_name"]:
            assert two["key_from"] == one["key_to"]
    assert all(b["keys"] > 0 and b["ms"] >= 0 and b["retries"] == 0 for b in batches)
    # every batch changed rows and its checkpoint: the primary wrote WAL for it
    assert all(b["wal_bytes"] > 0 for b in batches), [b["wal_bytes"] for b in batches]
    run_end = next(e for e in lines if e["event"] == "run_end")
    assert run_end["run_id"] == result["run_id"] and run_end["outcome"] == "succeeded"
    assert run_end["rows"] == applied


def test_a_rollback_streams_to_stderr_with_a_dash(realistic_db):
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    result = toolkit(realistic_db, "rollback", "milestone-1", "--batch-size", "5", "--events", "-")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines[0]["event"] == "start" and lines[-1] == {**lines[-1], "event": "end", "exit_code": 0}
    rolled = [e for e in lines if e["event"] == "run_start"]
    assert rolled and rolled[0]["verb"] == "rollback"
    run_id = rolled[0]["run_id"]
    assert sum(e["rows"] for e in lines if e["event"] == "batch") == history_rows(realistic_db)[run_id] > 0


def test_a_failed_run_ends_its_stream_with_the_exit_code(realistic_db, tmp_path):
    events = tmp_path / "refused.jsonl"
    result = toolkit(realistic_db, "migrate", "milestone-2", "--events", str(events))
    assert result.exit_code == 3, result.output  # milestone-1 is not applied: refused
    last = lines_of(events)[-1]
    assert last["event"] == "end" and last["exit_code"] == 3 and last["ok"] is False
    assert last["outcome"] == "PreconditionRefused" and "milestone-1" in last["error"]["problem"]


def test_a_run_killed_half_way_leaves_every_line_whole(realistic_db, tmp_path):
    events = tmp_path / "killed.jsonl"
    died = toolkit_process(realistic_db, "migrate", "milestone-1", "--batch-size", "5",
                           "--events", str(events), env={FAULT_KILL_AFTER_BATCHES_ENV: "3"})
    assert died.returncode == -signal.SIGKILL
    lines = lines_of(events)
    batches = [e for e in lines if e["event"] == "batch"]
    assert len(batches) == 3 and lines[-1]["event"] == "batch"  # no end: it was killed
    assert sum(b["rows"] for b in batches) == realistic_db.scalar(
        "SELECT sum(rows_done) FROM toolkit.checkpoints")

    resumed = toolkit_process(realistic_db, "migrate", "milestone-1", "--batch-size", "5",
                              "--events", str(events))
    assert resumed.returncode == 0, resumed.stderr
    lines = lines_of(events)  # appended: two commands, told apart by their run id
    assert len({e["run"] for e in lines}) == 2 and lines[-1]["event"] == "end"
    assert sum(e["rows"] for e in lines if e["event"] == "batch") == realistic_db.scalar(
        "SELECT count(*) FROM toolkit.m1_converted_packages")


def test_a_throttle_wait_is_streamed_with_its_signal(realistic_db, tmp_path):
    flag, events = tmp_path / "hold", tmp_path / "throttled.jsonl"
    flag.touch()
    result = toolkit(realistic_db, "migrate", "milestone-1", "--throttle-flag-file", str(flag),
                     "--max-throttle-s", "0.3", "--events", str(events))
    assert result.exit_code == 6, result.output
    lines = lines_of(events)
    waited = next(e for e in lines if e["event"] == "throttle")
    assert waited["state"] == "waiting" and [s["signal"] for s in waited["signals"]] == ["flag_file"]
    ended = next(e for e in lines if e["event"] == "run_end")
    assert ended["outcome"] == "throttled" and ended["throttled_seconds"]["flag_file"] >= 0.3
    assert lines[-1]["event"] == "end" and lines[-1]["exit_code"] == 6


def test_schema_changes_are_streamed_attempt_by_attempt(realistic_db, tmp_path):
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    events = tmp_path / "m2.jsonl"
    code, doc = toolkit_json(realistic_db, "migrate", "milestone-2", "--events", str(events))
    assert code == 0, doc
    lines = lines_of(events)
    attempts = [e for e in lines if e["event"] == "schema_change"]
    changed = [p["name"] for p in doc["result"]["passes"] if p["schema_change"] and p["changed"]]
    assert changed and [a["pass_name"] for a in attempts if a["result"] == "applied"] == changed
    assert sum(e["rows"] for e in lines if e["event"] == "batch") == doc["result"]["rows"]


def metrics_of(path) -> dict[str, dict[tuple, float]]:
    """Every sample of the textfile, read by Prometheus' own parser: {name: {labels: value}}."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "database"))
            samples.setdefault(s.name, {})[labels] = s.value
    return samples


def test_the_metrics_textfile_counts_what_history_counts(realistic_db, tmp_path):
    prom = tmp_path / "toolkit.prom"
    events = tmp_path / "events.jsonl"
    code, doc = toolkit_json(realistic_db, "migrate", "milestone-1", "--batch-size", "5",
                             "--metrics-textfile", str(prom), "--events", str(events))
    assert code == 0, doc
    metrics = metrics_of(prom)
    wal = [e["wal_bytes"] for e in lines_of(events) if e["event"] == "batch"]
    assert sum(metrics["toolkit_wal_bytes_total"].values()) == sum(wal) > 0
    result = doc["result"]
    updated = metrics["batched_migration_job_updated_tuples_total"]
    assert {dict(k)["migration_identifier"] for k in updated} == {
        f"milestone-1/{p['name']}" for p in result["passes"] if p["batches"]}
    assert sum(updated.values()) == history_rows(realistic_db)[result["run_id"]] == result["rows"] > 0
    assert sum(metrics["batched_migration_job_duration_seconds_count"].values()) == sum(
        p["batches"] for p in result["passes"])
    for key, keys in metrics["batched_migration_migrated_tuples_total"].items():
        assert keys == metrics["batched_migration_total_tuple_count"][key]  # the pass is done
        assert metrics["batched_migration_job_batch_size"][key] <= 5
    assert metrics["toolkit_lease_held"][()] == 0 and metrics["toolkit_run_finished"][()] == 1
    assert metrics["toolkit_run_exit_code"][()] == 0 and metrics["toolkit_run_failed"][()] == 0
    assert sorted(f.name for f in tmp_path.iterdir()) == ["events.jsonl", "toolkit.prom"]  # no temporary

    # the alert rules of docs/operations.md parse, and name only metrics the file has
    rules = yaml.safe_load(textwrap.dedent(OPERATIONS.read_text().split("## Alert rules", 1)[1]
                                           .split("\n\n", 1)[1]))
    alerts = rules["groups"][0]["rules"]
    assert [a["alert"] for a in alerts] == ["ToolkitRunStalled", "ToolkitThrottledTooLong",
                                           "ToolkitRunFailed"]
    named = {m for a in alerts for m in re.findall(r"\b(?:batched_migration|toolkit)_\w+", a["expr"])}
    families = {s.name for f in text_string_to_metric_families(prom.read_text()) for s in f.samples}
    assert named and named <= families | {"toolkit_throttled_seconds_total"}  # that one: once throttled


def test_the_metrics_textfile_is_whole_after_every_batch(realistic_db, tmp_path):
    prom = tmp_path / "toolkit.prom"
    died = toolkit_process(realistic_db, "migrate", "milestone-1", "--batch-size", "5",
                           "--metrics-textfile", str(prom), env={FAULT_KILL_AFTER_BATCHES_ENV: "3"})
    assert died.returncode == -signal.SIGKILL
    metrics = metrics_of(prom)  # written after the third batch, before the kill
    assert sum(metrics["batched_migration_job_duration_seconds_count"].values()) == 3
    assert sum(metrics["batched_migration_job_updated_tuples_total"].values()) == realistic_db.scalar(
        "SELECT sum(rows_done) FROM toolkit.checkpoints")
    assert metrics["toolkit_lease_held"][()] == 1 and metrics["toolkit_run_finished"][()] == 0


def test_the_metrics_textfile_tells_throttling_and_failure_apart(realistic_db, tmp_path):
    flag, prom = tmp_path / "hold", tmp_path / "toolkit.prom"
    flag.touch()
    result = toolkit(realistic_db, "migrate", "milestone-1", "--throttle-flag-file", str(flag),
                     "--max-throttle-s", "0.3", "--metrics-textfile", str(prom))
    assert result.exit_code == 6, result.output
    metrics = metrics_of(prom)
    assert metrics["toolkit_throttled_seconds_total"][(("signal", "flag_file"),)] >= 0.3
    assert metrics["toolkit_run_failed"][()] == 0  # a resumable stop, not a failure
    flag.unlink()
    result = toolkit(realistic_db, "migrate", "milestone-3", "--metrics-textfile", str(prom))
    assert result.exit_code == 3, result.output
    metrics = metrics_of(prom)
    assert metrics["toolkit_run_failed"][()] == 1 and metrics["toolkit_run_exit_code"][()] == 3
