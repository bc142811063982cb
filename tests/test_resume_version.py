"""A run does not resume what another toolkit version left unfinished (issue 32).

A stopped run's history row records its toolkit version; a later toolkit version is
simulated by changing that record. The resume is refused (exit 3, both versions named,
nothing written) unless ``--resume-with-this-version``, with which it ends where an
uninterrupted run ends. The same version resumes as before.
"""

from __future__ import annotations

from contract import KILL_BATCH_SIZE
from helpers import differences, end_state, snapshot, toolkit

import toolkit as toolkit_package
from toolkit.errors import ExitCode

BATCH = str(KILL_BATCH_SIZE)


def _left_by(db, milestone: str) -> int:
    return db.scalar("SELECT last_run_id FROM toolkit.milestones WHERE milestone = :m", m=milestone)


def _written_by(db, run_id: int, version: str | None) -> None:
    """What the stopped run would have recorded had it been ``version`` (None: a toolkit from
    before versions were recorded)."""
    change = "options - 'toolkit_version'" if version is None else \
        "options || jsonb_build_object('toolkit_version', CAST(:v AS text))"
    db.execute(f"UPDATE toolkit.runs SET options = {change} WHERE id = :id", id=run_id, v=version)


def test_a_resume_of_another_versions_checkpoint_is_refused_unless_accepted(milestone_states,
                                                                            make_database):
    clean, applied = milestone_states.applied("adversarial", 3)  # uninterrupted, same batches
    assert applied.code == 0, applied.doc
    db = make_database(like=milestone_states.before("adversarial", 3))
    first = toolkit(db, "migrate", "milestone-3", "--batch-size", BATCH, "--max-batches", "3")
    assert first.exit_code == 0 and "stopped (max-batches)" in first.output, first.output
    stopped_by = _left_by(db, "milestone-3")
    assert db.scalar("SELECT options->>'toolkit_version' FROM toolkit.runs WHERE id = :id",
                     id=stopped_by) == toolkit_package.__version__
    _written_by(db, stopped_by, "0.0.9")
    before, runs = snapshot(db), db.scalar("SELECT count(*) FROM toolkit.runs")

    refused = toolkit(db, "migrate", "milestone-3", "--batch-size", BATCH)
    assert refused.exit_code == ExitCode.REFUSED, refused.output
    lines = refused.output.strip().splitlines()
    assert lines[-1] == (
        f"error: not resuming milestone-3: its unfinished checkpoint (run {stopped_by}) was written "
        f"by toolkit 0.0.9, this is toolkit {toolkit_package.__version__}. Next: finish it with the "
        "version that started it (toolkit 0.0.9), or pass --resume-with-this-version to accept "
        "this one"), refused.output
    assert "Resuming" not in refused.output
    # nothing written, not even a history row: the next attempt is checked against the same run
    assert snapshot(db) == before
    assert db.scalar("SELECT count(*) FROM toolkit.runs") == runs
    assert _left_by(db, "milestone-3") == stopped_by
    again = toolkit(db, "migrate", "milestone-3", "--batch-size", BATCH)
    assert again.exit_code == ExitCode.REFUSED, again.output

    accepted = toolkit(db, "migrate", "milestone-3", "--batch-size", BATCH, "--resume-with-this-version")
    assert accepted.exit_code == 0, accepted.output
    assert f"(where run {stopped_by} stopped)" in accepted.output, accepted.output
    state = end_state(db)
    assert state == end_state(clean), differences(state, end_state(clean))


def test_the_same_version_resumes_and_an_unrecorded_one_is_refused_for_a_rollback(milestone_states,
                                                                                   make_database):
    clean, _ = milestone_states.applied("adversarial", 3)
    db = make_database(like=clean)
    first = toolkit(db, "rollback", "milestone-3", "--batch-size", "2", "--max-batches", "2")
    assert first.exit_code == 0, first.output
    same = toolkit(db, "rollback", "milestone-3", "--batch-size", "2", "--max-batches", "2")
    assert same.exit_code == 0 and "Resuming the rollback of milestone-3" in same.output, same.output

    _written_by(db, _left_by(db, "milestone-3"), None)
    refused = toolkit(db, "rollback", "milestone-3", "--batch-size", "2")
    assert refused.exit_code == ExitCode.REFUSED, refused.output
    assert ("error: not resuming the rollback of milestone-3: its unfinished checkpoint (run "
            f"{_left_by(db, 'milestone-3')}) was written by a toolkit that did not record its version, "
            f"this is toolkit {toolkit_package.__version__}. Next: finish it with the version that "
            "started it, or pass --resume-with-this-version") in refused.output, refused.output
    accepted = toolkit(db, "rollback", "milestone-3", "--resume-with-this-version")
    assert accepted.exit_code == 0, accepted.output
    assert db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-3'") == "rolled_back"
