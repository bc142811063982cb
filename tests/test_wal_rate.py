"""``--max-wal-rate MB/s``: a run waits at a batch boundary while the primary writes WAL
faster than the limit (issue 32), as it waits on the other health signals.

Any batch writes kilobytes of WAL in milliseconds, far above 0.01 MB/s over the 5 s
window, so such a run waits after its first writes; ``--max-throttle-s`` ends the wait
with the resumable exit 6, and the run resumed without the limit ends where an
uninterrupted run ends.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from contract import KILL_BATCH_SIZE
from helpers import differences, end_state, toolkit
from test_observe import metrics_of

from toolkit.cli import params
from toolkit.cli.main import cli
from toolkit.errors import ExitCode


def test_a_run_over_the_wal_rate_waits_and_resumes_to_the_same_end(milestone_states, make_database,
                                                                     tmp_path):
    clean, applied = milestone_states.applied("adversarial", 3)
    assert applied.code == 0, applied.doc
    db = make_database(like=milestone_states.before("adversarial", 3))
    events, prom = tmp_path / "events.jsonl", tmp_path / "toolkit.prom"
    held = toolkit(db, "migrate", "milestone-3", "--batch-size", str(KILL_BATCH_SIZE),
                   "--max-wal-rate", "0.01", "--max-throttle-s", "1", "--events", str(events),
                   "--metrics-textfile", str(prom))
    assert held.exit_code == ExitCode.THROTTLED, held.output
    assert "wal rate: the primary wrote" in held.output and "(limit 0.01 MB/s)" in held.output, held.output
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    waits = [s for e in lines if e["event"] == "throttle" and e["state"] == "waiting" for s in e["signals"]]
    assert waits and all(s["signal"] == "wal_rate" and s["limit"] == 0.01 and s["value"] > 0.01
                         for s in waits), waits
    ended = next(e for e in lines if e["event"] == "run_end")
    assert ended["outcome"] == "throttled" and ended["throttled_seconds"]["wal_rate"] >= 1
    options = db.scalar("SELECT options FROM toolkit.runs ORDER BY id DESC LIMIT 1")
    assert options["max_wal_rate_mb_s"] == 0.01 and options["throttled_seconds"]["wal_rate"] >= 1
    assert metrics_of(prom)["toolkit_throttled_seconds_total"][(("signal", "wal_rate"),)] >= 1

    resumed = toolkit(db, "migrate", "milestone-3", "--batch-size", str(KILL_BATCH_SIZE))
    assert resumed.exit_code == 0 and "Resuming milestone-3" in resumed.output, resumed.output
    state = end_state(db)
    assert state == end_state(clean), differences(state, end_state(clean))


@pytest.mark.parametrize("value, said", [
    ("0", "'0' is less than 0.001 MB/s"),
    ("-1", "'-1' is less than 0.001 MB/s"),
    ("nan", "'nan' is not a finite number of MB/s"),
    ("fast", "'fast' is not a number of MB/s"),
    ("1e9", "'1e9' is more than 1,048,576 MB/s"),
])
def test_a_bad_wal_rate_is_a_usage_error(value: str, said: str):
    for verb in ("migrate", "rollback"):
        result = CliRunner().invoke(cli, ["--database-url", "postgresql://nobody@127.0.0.1:9/none", verb,
                                          "milestone-1", "--max-wal-rate", value])
        assert result.exit_code == ExitCode.USAGE, result.output
        assert f"Invalid value for '--max-wal-rate': {said}" in result.output, result.output


def test_the_wal_rate_bounds_are_accepted():
    assert params.WAL_RATE.convert("0.001", None, None) == 0.001
    assert params.WAL_RATE.convert("1048576", None, None) == 1024 * 1024


def test_a_wal_rate_wait_ends_by_itself_once_the_window_is_quiet(milestone_states, make_database, tmp_path):
    """Nothing else writes: the wait ends once the batches' WAL is older than the window,
    and the run goes on (``--max-throttle-s`` only a bound against a hang)."""
    db = make_database(like=milestone_states.before("adversarial", 3))
    events = tmp_path / "events.jsonl"
    ran = toolkit(db, "migrate", "milestone-3", "--batch-size", str(KILL_BATCH_SIZE), "--max-batches", "2",
                  "--max-wal-rate", "0.01", "--max-throttle-s", "120", "--events", str(events))
    assert ran.exit_code == 0 and "stopped (max-batches)" in ran.output, ran.output
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    resumed = [e for e in lines if e["event"] == "throttle" and e["state"] == "resumed"]
    assert resumed and resumed[-1]["throttled_seconds"]["wal_rate"] > 0, lines
    assert sum(1 for e in lines if e["event"] == "batch") == 2
