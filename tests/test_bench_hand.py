"""The benchmark's hand-written forms (scripts/bench_hand.py) make the same change as the
toolkit's apply: after each form, the rows the milestone changes (and, for 2 and 4, the
schema it leaves) are those `toolkit migrate` leaves on a copy of the same database.
Otherwise the benchmark's ratios would compare the toolkit with a different change."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from helpers import toolkit

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_hand.py"
spec = importlib.util.spec_from_file_location("bench_hand", SCRIPT)
bench_hand = importlib.util.module_from_spec(spec)
sys.modules["bench_hand"] = bench_hand
spec.loader.exec_module(bench_hand)


def _changed(db, milestone: str, marks: dict[str, int]) -> dict[str, str]:
    with db.engine.connect() as conn:
        return bench_hand.changed_rows(conn, milestone, marks)


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_each_hand_form_leaves_the_rows_the_toolkit_leaves(before_milestone, make_database, number):
    milestone = f"milestone-{number}"
    base = before_milestone(number, "realistic")
    with base.engine.connect() as conn:
        marks = bench_hand.watermarks(conn)
        before = bench_hand.changed_rows(conn, milestone, marks)
    by_toolkit = make_database(like=base)
    result = toolkit(by_toolkit, "migrate", milestone, "--yes")
    assert result.exit_code == 0, result.output
    expected = _changed(by_toolkit, milestone, marks)
    assert expected != before  # the milestone changed something the digest sees
    for form in bench_hand.FORMS:
        db = make_database(like=base)
        bench_hand.run(db.url, milestone, form)
        assert _changed(db, milestone, marks) == expected, form


def test_guarded_form_leaves_milestone_1s_anomalies_as_the_toolkit_does(make_database):
    """Adversarial data: cross-project packages, ml_model collisions and long status
    messages stay generic after the guarded and ledgered forms, as after the toolkit's apply
    (the bare form converts what it should not, or fails on the unique index)."""
    base = make_database("adversarial:small")
    with base.engine.connect() as conn:
        marks = bench_hand.watermarks(conn)
    by_toolkit = make_database(like=base)
    toolkit(by_toolkit, "migrate", "milestone-1", "--yes")
    expected = _changed(by_toolkit, "milestone-1", marks)
    for form in ("guarded", "ledgered"):
        db = make_database(like=base)
        bench_hand.run(db.url, "milestone-1", form)
        assert _changed(db, "milestone-1", marks) == expected, form
    ledgered = db.rows("SELECT package_id FROM toolkit.m1_converted_packages ORDER BY 1")
    assert [r[0] for r in ledgered] == [r[0] for r in by_toolkit.rows(
        "SELECT package_id FROM toolkit.m1_converted_packages ORDER BY 1")]
