"""Milestone states and run outcomes are enums whose values are what ``toolkit.milestones``,
``toolkit.runs`` and ``--json`` already hold: a row an earlier toolkit wrote reads as its
member, and one spelled with the other separator (``rolled back``, ``stopped_unrecorded``)
reads as the same member, while what is written and printed keeps its one spelling."""

from __future__ import annotations

from helpers import toolkit, toolkit_json

from toolkit.engine import state
from toolkit.engine.results import MilestoneState, Outcome


def _applied_then_written(db, written: str) -> None:
    """Milestone 1 applied and rolled back by the toolkit, then its state row set by hand
    to ``written``, as an earlier toolkit (or a hand repair) could have left it."""
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    assert toolkit(db, "rollback", "milestone-1").exit_code == 0
    db.execute("UPDATE toolkit.milestones SET state = :s WHERE milestone = 'milestone-1'", s=written)


def test_a_stored_state_reads_as_its_member_and_prints_as_stored(realistic_db):
    _applied_then_written(realistic_db, "rolled_back")
    with realistic_db.engine.connect() as conn:
        read = state.milestone_state(conn, "milestone-1")["state"]
        fresh = state.milestone_state(conn, "milestone-2")["state"]
    assert read is MilestoneState.ROLLED_BACK and fresh is MilestoneState.NOT_STARTED
    status = toolkit_json(realistic_db, "status")[1]["result"]["milestones"]
    assert [m["state"] for m in status] == ["rolled_back", "not started", "not started", "not started"]


def test_a_state_spelled_with_the_other_separator_still_reads(realistic_db):
    """``rolled back`` (a space) is the rolled-back state: verify skips it as rolled back, and
    status prints it in the one spelling, ``rolled_back``."""
    _applied_then_written(realistic_db, "rolled back")
    with realistic_db.engine.connect() as conn:
        assert state.milestone_state(conn, "milestone-1")["state"] is MilestoneState.ROLLED_BACK
    again = toolkit(realistic_db, "verify")
    assert again.exit_code == 0 and "milestone-1: rolled back (not checked)" in again.output, again.output
    status = toolkit_json(realistic_db, "status")[1]["result"]["milestones"]
    assert status[0]["state"] == "rolled_back"
    # a new write keeps the one spelling
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    assert realistic_db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-1'") == "verified"


def test_outcomes_read_in_either_spelling_and_are_written_as_history_holds_them(realistic_db):
    assert Outcome("stopped unrecorded") is Outcome("stopped_unrecorded") is Outcome.STOPPED_UNRECORDED
    assert Outcome("verification failed") is Outcome.VERIFICATION_FAILED
    assert MilestoneState("not_started") is MilestoneState.NOT_STARTED
    assert toolkit(realistic_db, "migrate", "milestone-1", "--max-batches", "1", "--batch-size", "5").exit_code == 0
    # the run's end lost (as if killed): the next run records it as history always has
    realistic_db.execute("UPDATE toolkit.runs SET outcome = 'running', finished_at = NULL")
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    outcomes = [r[0] for r in realistic_db.rows("SELECT outcome FROM toolkit.runs ORDER BY id")]
    assert outcomes == ["stopped unrecorded", "succeeded"]
    history = toolkit_json(realistic_db, "history")[1]["result"]["runs"]
    assert [h["outcome"] for h in history] == ["succeeded", "stopped unrecorded"]
