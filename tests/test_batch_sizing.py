"""Batch sizes: fixed when the operator names one, following a time budget otherwise."""

from __future__ import annotations

import pytest
from helpers import OnePassStep, toolkit_json

from toolkit import milestones as registry
from toolkit.engine.plan import Milestone
from toolkit.engine.settings import DEFAULT_TARGET_BATCH_MS
from toolkit.engine.sizing import BatchSizer

MS_PER_KEY = 2


SLOW_PER_KEY = OnePassStep("slow-per-key", "ml_candidate_metrics", f"""
    SELECT count(*) * 0 FROM (SELECT pg_sleep({MS_PER_KEY / 1000}) FROM ml_candidate_metrics
                              WHERE id > :lo AND id <= :hi) AS slept""")


@pytest.fixture
def slow_milestone_1(monkeypatch):
    m1 = Milestone(name="milestone-1", title="test-only milestone", steps=(SLOW_PER_KEY,), reads=("ml_candidate_metrics",))
    monkeypatch.setitem(registry.MILESTONES, "milestone-1", m1)


def _walk(db, *options: str) -> tuple[int, dict]:
    """Run the slow pass to its end; the number of keys and the pass as ``--json`` shows it."""
    code, doc = toolkit_json(db, "migrate", "milestone-1", *options)
    assert code == 0, doc
    done = doc["result"]["passes"][0]
    assert done["complete"]
    assert done["batches"] == db.scalar("SELECT batches_done FROM toolkit.checkpoints")
    return db.scalar("SELECT count(*) FROM ml_candidate_metrics"), done


def test_a_named_batch_size_is_kept_for_every_batch(realistic_db, slow_milestone_1):
    total, done = _walk(realistic_db, "--batch-size", "300")
    assert done["batch_sizes"]["largest"] == 300 and done["batch_sizes"]["first"] == 300
    assert done["batches"] == -(-total // 300)


def test_fast_batches_grow_toward_the_budget(realistic_db, slow_milestone_1):
    # a key costs at least 2 ms (more: a sleep overshoots), so 600 ms is at most 300 keys,
    # and a size at most doubles past it
    total, done = _walk(realistic_db, "--batch-size", "50", "--target-batch-ms", "600")
    sizes = done["batch_sizes"]
    assert sizes["first"] == 50 and 100 <= sizes["largest"] <= 2 * 600 // MS_PER_KEY, sizes
    assert done["batches"] < total // 50


def test_without_a_size_batches_start_at_a_thousand_keys_and_shrink_to_the_budget(
        realistic_db, slow_milestone_1):
    total, done = _walk(realistic_db)
    sizes = done["batch_sizes"]
    # 1000 keys take at least 2 s, twice the default budget: the next batches are half
    assert DEFAULT_TARGET_BATCH_MS * 2 <= 1000 * MS_PER_KEY
    assert total > 2000 and sizes["first"] == 1000 and sizes["smallest"] <= 600, sizes
    history = realistic_db.scalar("SELECT options FROM toolkit.runs ORDER BY id DESC LIMIT 1")
    assert history["batch_size"] == 1000 and history["target_batch_ms"] == DEFAULT_TARGET_BATCH_MS


def test_the_sizer_moves_at_most_by_half_or_double_and_stays_in_its_bounds():
    fixed = BatchSizer(1000)
    assert [fixed.record(9.0, 1000) for _ in range(3)] == [1000, 1000, 1000]

    sizer = BatchSizer(1000, target_ms=500, smallest=100, largest=5000)
    assert sizer.record(0.001, 1000) == 2000  # far under budget: doubles, no more
    assert sizer.record(0.001, 2000) == 4000
    assert sizer.record(0.001, 4000) == 5000  # the ceiling
    slow = BatchSizer(1000, target_ms=500, smallest=100)
    assert slow.record(60.0, 1000) == 500  # far over budget: halves, no more
    assert slow.record(60.0, 500) == 250
    assert slow.record(60.0, 250) == 125
    assert slow.record(60.0, 125) == 100  # the floor
    named_small = BatchSizer(10, target_ms=500, smallest=100)
    assert named_small.smallest == 10  # an operator's own start widens the bounds
