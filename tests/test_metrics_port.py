"""``--metrics-port``: the textfile's metrics served on 127.0.0.1 while the run goes, scraped
mid-run (the run paused by ``toolkit control`` so what is scraped can be compared with the
batches it committed) and read by Prometheus' own parser; a port in use is a usage error
before anything is written.

Milestone 1 on the small realistic data set in batches of 5 keys, with a pause between
them; what happened is read from the run's --events file, never from the clock.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from faults import Running, end_left, start_toolkit
from helpers import snapshot, toolkit
from prometheus_client.parser import text_string_to_metric_families

SLOW = ("--batch-size", "5", "--pause-ms", "200")
_started: list[Running] = []


@pytest.fixture(autouse=True)
def _end_runs_left():
    """A failing test leaves no paused run of its own going (it would never end)."""
    yield
    end_left(_started)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(run: Running, found, timeout_s: float = 90):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := found():
            return value
        assert run.process.poll() is None, f"the run ended first: {run.stderr.read_text()}"
        time.sleep(0.1)
    raise AssertionError("the run never got there")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_port_serves_the_runs_metrics_while_it_runs(realistic_db, tmp_path):
    port, events = free_port(), tmp_path / "run.jsonl"
    run = start_toolkit(realistic_db, ("migrate", "milestone-1", *SLOW, "--events", str(events),
                                       "--metrics-port", str(port)), tmp_path, "served")
    _started.append(run)
    wait_until(run, lambda: any(e["event"] == "batch" for e in lines_of(events)))
    assert toolkit(realistic_db, "control", "pause").exit_code == 0
    wait_until(run, lambda: any(e["event"] == "control" for e in lines_of(events)))

    samples = scrape(port)  # paused: no batch commits until resume
    rows: dict[str, int] = {}
    for e in lines_of(events):
        if e["event"] == "batch":
            key = f"{e['milestone']}/{e['pass_name']}"
            rows[key] = rows.get(key, 0) + e["rows"]
    database = realistic_db.url.database
    served = {dict(labels)["migration_identifier"]: value for (name, labels), value in samples.items()
              if name == "batched_migration_job_updated_tuples_total"}
    assert served == rows and sum(rows.values()) > 0
    assert samples[("toolkit_lease_held", (("database", database),))] == 1
    assert samples[("toolkit_run_finished", (("database", database),))] == 0

    assert toolkit(realistic_db, "control", "resume").exit_code == 0
    code, _, err = run.wait()
    assert code == 0, err
    with pytest.raises(urllib.error.URLError):  # served for the command's duration only
        scrape(port)


def test_a_port_in_use_is_a_usage_error_before_anything_is_written(realistic_db):
    before = snapshot(realistic_db)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = toolkit(realistic_db, "migrate", "milestone-1", "--metrics-port", str(port))
    assert result.exit_code == 2, result.output
    assert f"port {port} on 127.0.0.1 is in use" in result.output
    assert "Using the database" not in result.output and snapshot(realistic_db) == before
    assert not realistic_db.scalar("SELECT to_regclass('toolkit.runs') IS NOT NULL") or \
        realistic_db.scalar("SELECT count(*) FROM toolkit.runs") == 0
