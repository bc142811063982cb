"""Kill matrix: for every data step of every milestone, SIGKILL at a random batch of that
step (several seeds), run again, and compare with an uninterrupted run on a twin database.

"Equal" means: the fingerprint (every ML table and the MLflow view) and the toolkit's
ledgers and archive, row for row, leaving out only run ids and timestamps of its own
bookkeeping (a resumed milestone has two runs where the uninterrupted one has one).
"""

from __future__ import annotations

import random
import signal

import pytest
from helpers import (
    TALLY,
    end_state,
    resolve_m1_anomalies,
    rows_compared,
    toolkit,
    toolkit_json,
    toolkit_process,
)

from toolkit.engine.batches import FAULT_KILL_AFTER_BATCHES_ENV

MILESTONES = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")
SEEDS = (3, 17)
BATCH_SIZE = "4"


def _before(milestone: str, make_database):
    """A database with the milestones before ``milestone`` applied."""
    db = make_database("adversarial:small")
    resolve_m1_anomalies(db)
    for earlier in MILESTONES[:MILESTONES.index(milestone)]:
        assert toolkit(db, "migrate", earlier).exit_code == 0
    return db


@pytest.mark.parametrize("milestone", MILESTONES)
def test_a_kill_at_a_random_batch_of_every_data_step_resumes_to_the_uninterrupted_end_state(
        milestone, make_database):
    base = _before(milestone, make_database)
    clean = make_database(like=base)
    code, doc = toolkit_json(clean, "migrate", milestone, "--yes", "--batch-size", BATCH_SIZE)
    assert code == 0, doc
    expected = end_state(clean)

    # batch numbers are counted across the run; each data step owns a range of them
    ranges, first = [], 1
    for step in doc["result"]["passes"]:
        if step["batches"]:
            ranges.append((step["name"], first, first + step["batches"] - 1))
            first += step["batches"]
    assert ranges, "the milestone has data steps"
    kills = 0
    for name, lo, hi in ranges:
        for seed in SEEDS:
            kill_after = random.Random(f"{milestone}/{name}/{seed}").randint(lo, hi)
            killed = make_database(like=base)
            died = toolkit_process(killed, "migrate", milestone, "--yes", "--batch-size", BATCH_SIZE,
                                   env={FAULT_KILL_AFTER_BATCHES_ENV: str(kill_after)})
            assert died.returncode == -signal.SIGKILL, (name, kill_after, died.stderr)
            resumed = toolkit_process(killed, "migrate", milestone, "--yes", "--batch-size", BATCH_SIZE)
            assert resumed.returncode == 0, (name, kill_after, resumed.stdout, resumed.stderr)
            assert end_state(killed) == expected, (name, kill_after)
            kills += 1
            TALLY["rows compared after a kill and a resume (kill matrix)"] += rows_compared(expected)
    assert kills == len(ranges) * len(SEEDS)
