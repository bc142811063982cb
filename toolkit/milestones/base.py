"""What the milestones share: when milestone 4 supersedes the checks of 2 and 3, and the
transition-trigger step. (What a milestone *is* lives in :mod:`toolkit.engine.plan`.)"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine import state
from toolkit.engine.catalog_checks import trigger_in_place
from toolkit.engine.ddl import SchemaStep
from toolkit.engine.results import STARTED, Check


def cleanup_started(conn: Connection) -> bool:
    """Milestone 4 has begun (or finished): what it removes may legitimately be gone."""
    return state.milestone_state(conn, "milestone-4")["state"] in STARTED


def superseded_by_cleanup(conn: Connection) -> bool:
    """True once milestone 4 has started (or its tables are gone): checks that join
    experiments are then answered by milestone 4's archive and its row-for-row check."""
    return cleanup_started(conn) or conn.execute(
        sa.text("SELECT to_regclass('ml_experiments') IS NULL")).scalar_one()


SUPERSEDED = "superseded: milestone 4 archived the experiments (toolkit.m4_archive_*)"


class TransitionTriggerStep(SchemaStep):
    """A schema step adding a transition trigger, which milestone 4 later removes on purpose."""

    trigger: str = ""
    table: str = ""
    milestone: str = ""

    def verify(self, conn: Connection) -> list[Check]:
        if superseded_by_cleanup(conn):
            return [Check(name=f"{self.trigger} is in place", ok=True, detail=SUPERSEDED)]
        return [trigger_in_place(conn, self.table, self.trigger, self.milestone)]
