"""When milestone 4 becomes final: once ``toolkit archive drop --yes`` has dropped its archive.

A rollback rebuilds ``ml_experiments`` from that archive and nothing else; without it no
command can bring the experiments back. Knowing this up front is what lets the runner
refuse such a rollback (exit 3, naming the drop's run and time) before it writes anything,
and ``status`` say the milestone is final instead of advising a rollback that cannot succeed.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine import state
from toolkit.engine.plan import Final
from toolkit.engine.results import MilestoneState
from toolkit.milestones.m4 import NAME
from toolkit.names import M4_ARCHIVE_EXPERIMENTS, M4_EXPERIMENT_IDS, OWN_SCHEMA
from toolkit.schema.migrations import own_schema_exists
from toolkit.timestamps import shown

DROP_COMMAND = "toolkit archive drop --yes"  # as history records it (toolkit.cli.archive)

_LAST_DROP = sa.text(f"""
    SELECT id, finished_at FROM {OWN_SCHEMA}.runs
    WHERE command LIKE 'toolkit archive drop%' AND outcome = 'succeeded'
    ORDER BY id DESC LIMIT 1""")

INSTEAD = (f"nothing can bring the experiments back: milestone 4's final state is kept (each model's "
           f"MLflow experiment id is in {M4_EXPERIMENT_IDS}) and every milestone still verifies; "
           "if the experiments themselves are needed, restore the database from a backup taken "
           "before the drop")


def archive_dropped(conn: Connection) -> Final | None:
    """The archive is gone while milestone 4's drops are in place: the drop's run and time
    (from history), or None while a rollback can still rebuild (or has already)."""
    if not own_schema_exists(conn) or catalog.relation_exists(conn, M4_ARCHIVE_EXPERIMENTS):
        return None
    if catalog.relation_exists(conn, "ml_experiments"):
        return None  # not dropped yet, or rebuilt by a rollback that finished its rebuild
    drop = conn.execute(_LAST_DROP).one_or_none()
    if drop is not None:
        return Final(f"its archive was dropped by run {drop.id} at {shown(drop.finished_at)} "
                     f"(`{DROP_COMMAND}`)", f"{INSTEAD} (run {drop.id})",
                     {"archive_dropped_by_run": drop.id,
                      "archive_dropped_at": drop.finished_at.isoformat() if drop.finished_at else None})
    if state.milestone_state(conn, NAME)["state"] in (MilestoneState.APPLIED, MilestoneState.VERIFIED):
        # Dropped by hand (or by a run history lost): the archive a rollback needs is gone all the same.
        return Final(f"its archive {M4_ARCHIVE_EXPERIMENTS} is gone (no `{DROP_COMMAND}` run is "
                     "recorded)", INSTEAD, {"archive_dropped_by_run": None, "archive_dropped_at": None})
    return None
