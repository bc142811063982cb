"""Where a run takes up a milestone that an earlier run of the same command left unfinished.

A run that was stopped (Ctrl-C, ``--max-batches``, a lost session, ``kill -9``, a
failure) leaves the milestone ``in_progress`` (a rollback: ``rolling_back``), the passes
it finished with a completed checkpoint, and the pass it was in with the last key it
committed. The next run resumes: it says where, and it does not walk the finished passes
again (on a large table one is many minutes of batches that change nothing). Schema
changes have no checkpoint; each is checked in place and said to be so, as before.

A run that does not resume (the milestone was applied, verified or rolled back, or
never started) walks every pass from its first key, as a pass does to pick up rows the
application wrote since (step.py): the completions its checkpoints keep from the last
time are forgotten first, so that a later resume of *this* attempt cannot take a pass
finished the time before as finished now.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from toolkit.engine import state
from toolkit.engine.actions import Action
from toolkit.engine.results import MilestoneState
from toolkit.engine.state import Checkpoint


@dataclass
class Resumption:
    """What an earlier run of this attempt finished, and where this one takes up."""

    milestone: str
    verb: str = "migrate"
    finished: dict[str, Checkpoint] = field(default_factory=dict)  # pass name -> its checkpoint
    at: str | None = None  # the first action not done
    after_key: int | None = None  # its checkpoint's last key, in a pass begun
    stopped_by: int | None = None  # the run that committed that key

    def line(self) -> str:
        """``Resuming milestone-3 at link-candidates after key 4000 (where run 12 stopped);
        finished before, not walked again: create-models-for-experiments``."""
        what = self.milestone if self.verb == "migrate" else f"the {self.verb} of {self.milestone}"
        if self.at is None:
            where = f"Resuming {what}: every pass and schema change was done before"
        elif self.after_key:
            by = f" (where run {self.stopped_by} stopped)" if self.stopped_by else ""
            where = f"Resuming {what} at {self.at} after key {self.after_key}{by}"
        else:
            where = f"Resuming {what} at {self.at}"
        if not self.finished:
            return where
        return f"{where}; finished before, not walked again: {', '.join(self.finished)}"


def resumes(previous_state: str, verb: str) -> bool:
    """Whether a run of ``verb`` takes up an unfinished earlier one: the state that earlier
    run left is the one this verb's runs hold while they work."""
    return previous_state == (MilestoneState.IN_PROGRESS if verb == "migrate"
                              else MilestoneState.ROLLING_BACK)


def prepare(conn: Connection, milestone: str, verb: str, actions: list[Action],
            resuming: bool) -> Resumption | None:
    """For a resumed run, where it takes up (read-only). For a fresh one, forget the
    completions of its passes' checkpoints, so that they are walked from the start (the
    caller commits) and a later resume finds only what this attempt finished; None."""
    batched = [a.name for a in actions if a.in_batches]
    if not actions:  # a final milestone: nothing to run, nothing to say about where
        return None
    if not resuming:
        state.forget_completed(conn, milestone, batched)
        return None
    found = Resumption(milestone, verb)
    for action in actions:
        checkpoint = state.read_checkpoint(conn, milestone, action.name) if action.in_batches else None
        if checkpoint is not None and checkpoint.completed_at is not None:
            found.finished[action.name] = checkpoint
            continue
        if found.at is not None:
            continue
        if action.in_batches:
            found.at = action.name
            if checkpoint is not None:
                found.after_key, found.stopped_by = checkpoint.last_key, checkpoint.run_id
        elif not action.is_done(conn):
            found.at = action.name
    return found
