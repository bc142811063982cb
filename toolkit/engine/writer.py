"""Who wrote a checkpoint: the toolkit version and the options that change what is written.

A resumed run takes up keys, ledger rows and archive rows an earlier run wrote. If that run
was another toolkit version, the two may disagree on what a pass writes (a fixed bug, a new
ledger column), and the milestone would end half one way and half the other, which neither
version's rollback or verify expects. So a run records its version (and the options that
change its rows) in its history row, ``toolkit.runs.options``, and a run that would resume an
unfinished milestone left by another version, or with other such options, is refused unless
the operator accepts it (``--resume-with-this-version``). Spirit refuses the same way.

No option of ``migrate``/``rollback`` changes the rows or the ledger today: batching
(sizes, targets, pauses), limits (batches, runtime), timeouts, retries, reconnects and the
health throttle change only *when* and in *how many transactions* the same rows are written.
``WRITE_OPTIONS`` is where one that does would be named, so that it is checked too.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

import toolkit
from toolkit.errors import PreconditionRefused
from toolkit.schema.own import SCHEMA

VERSION_KEY = "toolkit_version"
WRITES_WITH_KEY = "writes_with"
ACCEPT_FLAG = "--resume-with-this-version"
# RunOptions fields that change what a run writes (rows, ledger, archive): none today.
WRITE_OPTIONS: tuple[str, ...] = ()


def stamp(options: dict[str, Any]) -> dict[str, Any]:
    """What a run records of itself, beside its options, for a later resume to compare."""
    return {VERSION_KEY: toolkit.__version__,
            WRITES_WITH_KEY: {name: options.get(name) for name in WRITE_OPTIONS}}


class ResumeRefused(PreconditionRefused):
    """The unfinished milestone was written by another toolkit version or other options."""


def check(conn: Connection, milestone: str, verb: str, run_id: int | None,
          options: dict[str, Any], accept: bool) -> None:
    """Refuse (exit 3) to resume what run ``run_id`` left unfinished if it was written by
    another version or with other write options, unless ``accept``. A run from before
    versions were recorded counts as another version."""
    if accept or run_id is None:
        return
    recorded = conn.execute(sa.text(f"SELECT options FROM {SCHEMA}.runs WHERE id = :id"),
                            {"id": run_id}).scalar() or {}
    theirs = recorded.get(VERSION_KEY)
    mine = stamp(options)
    differ = []
    if theirs != mine[VERSION_KEY]:
        written = f"toolkit {theirs}" if theirs else "a toolkit that did not record its version"
        differ.append(f"written by {written}, this is toolkit {mine[VERSION_KEY]}")
    their_options = recorded.get(WRITES_WITH_KEY) or {}
    changed = [f"{name}={their_options.get(name)!r} there, {mine[WRITES_WITH_KEY][name]!r} now"
               for name in WRITE_OPTIONS if their_options.get(name) != mine[WRITES_WITH_KEY][name]]
    if changed:
        differ.append("with other options (" + "; ".join(changed) + ")")
    if not differ:
        return
    what = milestone if verb == "migrate" else f"the {verb} of {milestone}"
    raise ResumeRefused(
        f"not resuming {what}: its unfinished checkpoint (run {run_id}) was {' and '.join(differ)}",
        f"finish it with the version that started it{f' (toolkit {theirs})' if theirs else ''}, or "
        f"pass {ACCEPT_FLAG} to accept this one")
