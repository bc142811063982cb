"""A failover in the middle of a run: the primary crashes, its streaming replica is promoted.

The run is given libpq's multi-host URL (primary, then replica, ``target_session_attrs=
read-write``), as an operator of a Patroni cluster would. With ``--reconnect N`` it resumes
by itself on the promoted replica; without, it stops with exit code 75 and the same
command resumes. Either way the end state equals an uninterrupted run on a twin of the
same data: every ML table, the MLflow view, and the toolkit's ledgers, row for row.

Replication is asynchronous: batches the primary committed but had not yet sent are lost
with it, checkpoint included (a batch and its checkpoint are one transaction), so the run
redoes them on the new primary.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from faults import SEQUENCE_ID_PARTS, id_free
from helpers import TALLY, differences, end_state, resolve_m1_anomalies, toolkit
from replication import Replication

from toolkit.errors import ExitCode
from toolkit.sandbox.server import SANDBOX_DATABASE

MILESTONE = "milestone-1"
RUN = ("migrate", MILESTONE, "--yes", "--batch-size", "4", "--pause-ms", "50")
TWIN = "twin"


@pytest.fixture
def pair():
    with Replication.started() as started:
        yield started


def _seeded_with_twin(pair: Replication) -> tuple:
    """Seed the primary, resolve milestone 1's anomalies, copy it, run the milestone on the
    copy without interruption: the end state the interrupted run must reach."""
    pair.seed("realistic", "small")
    db = pair.on_primary()
    resolve_m1_anomalies(db)
    db.dispose()
    pair.copy_database(SANDBOX_DATABASE, TWIN)
    twin = pair.on_primary(TWIN)
    done = toolkit(twin, "migrate", MILESTONE, "--yes", "--batch-size", "4")
    assert done.exit_code == 0, done.output
    expected = end_state(twin)
    twin.dispose()
    assert expected[2], "milestone 1 recorded a ledger"
    return expected


def _start_run(pair: Replication, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "TOOLKIT_DATABASE_URL": pair.multi_host_url(SANDBOX_DATABASE)}
    log = tmp_path / f"run-{len(list(tmp_path.glob('run-*.log'))) + 1}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "toolkit", *RUN, *extra], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, text=True)
    return process, log


@contextmanager
def _reaped(process: subprocess.Popen) -> Iterator[None]:
    """A run still going when the test fails is stopped, not left behind."""
    try:
        yield
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _batches_committed(db) -> int:
    if db.scalar("SELECT to_regclass('toolkit.checkpoints')") is None:
        return 0
    return db.scalar("SELECT coalesce(sum(batches_done), 0)::int FROM toolkit.checkpoints "
                     "WHERE milestone = :m", m=MILESTONE)


def _fail_over_after(pair: Replication, process: subprocess.Popen, batches: int) -> int:
    """Once the run has committed ``batches`` batches: replica caught up, primary crashed
    (immediate shutdown), replica promoted. Returns the batches committed at the crash."""
    primary = pair.on_primary()
    deadline = time.monotonic() + 30
    while (done := _batches_committed(primary)) < batches:
        assert process.poll() is None, "the run ended before the failover"
        assert time.monotonic() < deadline, f"only {done} batches committed after 30 s"
        time.sleep(0.02)
    primary.dispose()
    pair.wait_replayed()
    assert process.poll() is None, "the run ended before the failover: nothing was interrupted"
    pair.stop_primary("immediate")
    pair.promote()
    TALLY["primaries crashed and replicas promoted under a running migrate (failover)"] += 1
    return done


def test_a_failover_mid_run_reconnects_to_the_promoted_replica_and_ends_like_the_twin(pair, tmp_path):
    expected = _seeded_with_twin(pair)
    process, log = _start_run(pair, tmp_path, "--reconnect", "20")
    with _reaped(process):
        _fail_over_after(pair, process, 3)
        code = process.wait(timeout=45)
    output = log.read_text()
    assert code == 0, output
    assert "Traceback" not in output, output
    assert "reconnecting" in output, output
    promoted = pair.on_replica()
    assert end_state(promoted) == expected
    assert promoted.scalar("SELECT state FROM toolkit.milestones WHERE milestone = :m", m=MILESTONE) \
        == "verified"
    # the attempt the failover ended is recorded by the one that resumed, with what it committed
    runs = promoted.rows("SELECT outcome, rows_by_step, error FROM toolkit.runs ORDER BY id")
    assert [r[0] for r in runs] == ["interrupted", "succeeded"], runs
    assert "Interrupted" in runs[0][2]
    assert sum(sum(r[1].values()) for r in runs) == promoted.scalar(
        "SELECT count(*) FROM toolkit.m1_converted_packages")


def test_a_failover_mid_run_without_reconnect_exits_75_and_the_same_command_resumes(pair, tmp_path):
    expected = _seeded_with_twin(pair)
    process, log = _start_run(pair, tmp_path)
    with _reaped(process):
        _fail_over_after(pair, process, 3)
        code = process.wait(timeout=45)
    output = log.read_text()
    assert code == ExitCode.SESSION_LOST, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    assert "kept" in errors[0] and "run the same command again" in errors[0], errors[0]

    again, log = _start_run(pair, tmp_path)
    code = again.wait(timeout=45)
    assert code == 0, log.read_text()
    assert end_state(pair.on_replica()) == expected


FAILOVER_CASES = [("migrate", "milestone-2"), ("migrate", "milestone-3"), ("migrate", "milestone-4"),
                  ("rollback", "milestone-3")]
ORDER = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")


def _rows_of_runs_after(db, prior: int) -> int:
    """Rows the runs after run ``prior`` have committed (whatever milestone they run)."""
    return db.scalar("""SELECT coalesce(sum(value::bigint), 0) FROM toolkit.runs r,
                        jsonb_each_text(r.rows_by_step) WHERE r.id > :prior""", prior=prior)


@pytest.mark.parametrize(("verb", "milestone"), FAILOVER_CASES)
def test_a_failover_at_a_random_batch_of_other_milestones_and_a_rollback_ends_like_the_twin(
        pair, tmp_path, verb, milestone):
    """Each at a seeded random point: the run, with --reconnect, ends as an uninterrupted one."""
    pair.seed("realistic", "small")
    db = pair.on_primary()
    resolve_m1_anomalies(db)
    before = ORDER[:ORDER.index(milestone) + (1 if verb == "rollback" else 0)]
    for earlier in before:
        assert toolkit(db, "migrate", earlier, "--yes").exit_code == 0, earlier
    db.dispose()
    pair.copy_database(SANDBOX_DATABASE, TWIN)
    command = (verb, milestone, "--batch-size", "4", *(["--yes"] if verb == "migrate" else []))
    twin = pair.on_primary(TWIN)
    done = toolkit(twin, *command)  # at full speed: the pace changes nothing in the end state
    assert done.exit_code == 0, done.output
    expected, expected_id_free = end_state(twin), id_free(twin)
    twin.dispose()

    rows_at = random.Random(f"failover/{verb}/{milestone}").randint(4, 16)
    prior = pair.on_primary().scalar("SELECT max(id) FROM toolkit.runs")
    env = {**os.environ, "TOOLKIT_DATABASE_URL": pair.multi_host_url(SANDBOX_DATABASE)}
    log = tmp_path / "run.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "toolkit", *command, "--pause-ms", "100",
                                    "--reconnect", "20"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    with _reaped(process):
        primary = pair.on_primary()
        deadline = time.monotonic() + 30
        while _rows_of_runs_after(primary, prior) < rows_at:
            assert process.poll() is None, "the run ended before the failover: " + log.read_text()
            assert time.monotonic() < deadline, "the run did not get far enough in 30 s"
            time.sleep(0.02)
        primary.dispose()
        pair.wait_replayed()
        assert process.poll() is None, "the run ended before the failover: " + log.read_text()
        pair.stop_primary("immediate")
        pair.promote()
        TALLY["primaries crashed and replicas promoted under a running migrate (failover)"] += 1
        code = process.wait(timeout=60)
    output = log.read_text()
    assert code == 0, output
    assert "reconnecting" in output and "Traceback" not in output, output
    promoted = pair.on_replica()
    state = end_state(promoted)
    if state != expected:
        # a promotion is crash recovery: sequences resume after the values they had logged
        # ahead, so rows created after it have other ids than the twin's, and nothing else
        differ = differences(state, expected)
        assert set(differ) <= SEQUENCE_ID_PARTS, (verb, milestone, rows_at, differ)
        assert id_free(promoted) == expected_id_free, (verb, milestone, rows_at, differ)
        TALLY["end states equal but for the ids sequences skipped after a crash"] += 1
