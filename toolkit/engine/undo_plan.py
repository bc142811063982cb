"""What a rollback would do, counted read-only (``rollback MILESTONE --dry-run``).

The rollback's own actions are asked, in the order the rollback runs them: a batched pass
counts the rows it would restore or remove (its ``count``, else the rows of the ledger or
archive it walks), a schema change whether it is still to undo, a check or record that it
would run. Everything is read in one transaction the server itself keeps read-only
(engine/inspection.py), so a dry run cannot write, not even the toolkit's own history.

Counted before the rollback starts: a pass's count is what it finds now, which is what
it will change when the passes before it change other tables (each pass's ledger or
archive is its own).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine.actions import Action
from toolkit.engine.plan import Milestone
from toolkit.engine.results import CHECK, ROWS, SCHEMA, MilestoneState, UndoPass, UndoPlan
from toolkit.engine.step import KeysetPass


def count_pass(conn: Connection, kpass: KeysetPass) -> UndoPass:
    """A batched pass: its own count, else the rows of the table it walks (none when that
    table is gone or its ``skip_if_sql`` says there is nothing to walk)."""
    found = UndoPass(kpass.name, kpass.description, ROWS)
    if kpass.count is not None:
        found.breakdown = dict(kpass.count(conn))
        found.rows = next(iter(found.breakdown.values()), 0)
        return found
    if not catalog.relation_exists(conn, kpass.driving_table) or (
            kpass.skip_if_sql and conn.execute(sa.text(kpass.skip_if_sql)).scalar()):
        return found
    found.rows = conn.execute(sa.text(kpass.remaining_sql()), {"lo": 0, "upper": 2**62}).scalar_one()
    found.breakdown = {f"{kpass.driving_table} rows": found.rows}
    return found


def count_action(conn: Connection, action: Action) -> UndoPass:
    if isinstance(action, KeysetPass):
        return count_pass(conn, action)
    kind = CHECK if getattr(action, "outcome", None) is not None else SCHEMA
    return UndoPass(action.name, action.description, kind, pending=not action.is_done(conn))


def undo_plan(conn: Connection, milestone: Milestone, state_now: MilestoneState,
              actions: list[Action]) -> UndoPlan:
    return UndoPlan(milestone, state_now, [count_action(conn, a) for a in actions])
