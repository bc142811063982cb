"""A replica promoted before it received what the primary committed: the resumed run says
how many of its batches went back in time and will be done again, and history records it.

A real streaming pair (tests/replication.py). The run (``--reconnect``) commits a few
batches, the replica replays them, then the replica stops receiving (its
``primary_conninfo`` cleared: asynchronous replication falling behind), the primary
commits more batches, crashes (immediate stop) and the replica is promoted. The run
resumes on it, finds older checkpoints than it committed, and says so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import TALLY, end_state, resolve_m1_anomalies, toolkit
from replication import Replication, _engine

from toolkit.sandbox.server import SANDBOX_DATABASE

MILESTONE = "milestone-1"
RUN = ("migrate", MILESTONE, "--yes", "--batch-size", "4", "--pause-ms", "50")


@pytest.fixture
def pair():
    with Replication.started() as started:
        yield started


def _batches(db) -> int:
    if db.scalar("SELECT to_regclass('toolkit.checkpoints')") is None:
        return 0
    return db.scalar("SELECT coalesce(sum(batches_done), 0)::int FROM toolkit.checkpoints "
                     "WHERE milestone = :m", m=MILESTONE)


def _wait_for(db, process: subprocess.Popen, batches: int) -> int:
    deadline = time.monotonic() + 30
    while (done := _batches(db)) < batches:
        assert process.poll() is None, "the run ended too soon"
        assert time.monotonic() < deadline, f"only {done} batches committed after 30 s"
        time.sleep(0.02)
    return done


def _seeded_with_twin(pair: Replication) -> tuple:
    pair.seed("realistic", "small")
    seeded = pair.on_primary()
    resolve_m1_anomalies(seeded)
    seeded.dispose()
    pair.copy_database(SANDBOX_DATABASE, "twin")
    twin = pair.on_primary("twin")
    assert toolkit(twin, "migrate", MILESTONE, "--yes", "--batch-size", "4").exit_code == 0
    expected = end_state(twin)
    twin.dispose()
    return expected


def _run(pair: Replication, tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "TOOLKIT_DATABASE_URL": pair.multi_host_url(SANDBOX_DATABASE)}
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "toolkit", *RUN, *extra], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, text=True)
    return process, log


def _lossy_failover(pair: Replication, process: subprocess.Popen) -> int:
    """Replica caught up after 2 batches, then cut off; the primary commits 4 more and
    crashes; the replica is promoted. Returns the run's exit code."""
    try:
        primary = pair.on_primary()
        _wait_for(primary, process, 2)
        pair.wait_replayed()
        with _engine(pair.replica_status) as replica, replica.connect() as conn:
            conn.execute(sa.text("ALTER SYSTEM SET primary_conninfo = ''"))
            conn.execute(sa.text("SELECT pg_reload_conf()"))
            deadline = time.monotonic() + 20
            while conn.execute(sa.text("SELECT count(*) FROM pg_stat_wal_receiver")).scalar():
                assert time.monotonic() < deadline, "the replica kept receiving"
                time.sleep(0.05)
        cut = _batches(primary)
        _wait_for(primary, process, cut + 4)
        primary.dispose()
        pair.stop_primary("immediate")
        pair.promote()
        TALLY["unreplayed promotions under a running migrate"] += 1
        return process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


SAID = re.compile(r"warning: milestone-1: (\d+) batches this run committed went back in time "
                  r"\(convert-candidate-packages (\d+)\): the database it resumed on had not received "
                  r"them \(asynchronous replication\)(?:; the server is on timeline (\d+) \(was (\d+)\): "
                  r"a replica was promoted)?; they will be done again")


def test_an_unreplayed_promotion_is_detected_and_said(pair: Replication, tmp_path: Path):
    expected = _seeded_with_twin(pair)
    process, log = _run(pair, tmp_path, "run", "--reconnect", "20")
    code = _lossy_failover(pair, process)
    output = log.read_text()
    assert code == 0, output
    assert "Traceback" not in output, output
    said = SAID.search(output)
    assert said, output
    went_back, timeline, was = int(said[1]), int(said[3]), int(said[4])
    assert went_back >= 4 and timeline == was + 1, said[0]

    promoted = pair.on_replica()
    runs = promoted.rows("SELECT outcome, options FROM toolkit.runs ORDER BY id")
    assert [r[0] for r in runs] == ["interrupted", "succeeded"], runs
    assert runs[1][1]["went_back"] == {"batches": went_back, "steps": {"convert-candidate-packages": went_back},
                                       "timeline": [was, timeline]}, json.dumps(runs[1][1])
    assert end_state(promoted) == expected
    TALLY["unreplayed promotions detected (batches that went back in time, said)"] += 1


def test_without_reconnect_the_next_run_says_it(pair: Replication, tmp_path: Path):
    """The run exits 75; the same command run again (from this machine) says how many
    batches went back, records it, and ends like the twin."""
    expected = _seeded_with_twin(pair)
    process, log = _run(pair, tmp_path, "first")
    code = _lossy_failover(pair, process)
    assert code == 75, log.read_text()
    again, log = _run(pair, tmp_path, "again")
    assert again.wait(timeout=60) == 0, log.read_text()
    output = log.read_text()
    said = SAID.search(output)
    assert said and int(said[1]) >= 4, output
    promoted = pair.on_replica()
    runs = promoted.rows("SELECT outcome, options FROM toolkit.runs ORDER BY id")
    assert runs[-1][0] == "succeeded" and runs[-1][1]["went_back"]["batches"] == int(said[1]), runs
    assert end_state(promoted) == expected
