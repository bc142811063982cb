"""Which milestones ``toolkit adopt`` declared in place, and why that makes them final.

After the toolkit's schema was lost, ``toolkit adopt --yes`` records the milestones whose
work GitLab's tables show (engine/ledger.py tells them). What they changed is no longer
known, so no rollback can undo them: :func:`adopted_final` is every milestone's first
answer to "can it still be rolled back?" (``Milestone.final_now``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import relation_exists
from toolkit.engine.results import Final
from toolkit.schema.own import SCHEMA

ADOPT = "toolkit adopt"


def adopted_by(conn: Connection, milestone: str) -> dict[str, Any] | None:
    """The ``toolkit adopt`` run that declared ``milestone`` in place, if one did."""
    if not relation_exists(conn, f"{SCHEMA}.runs"):
        return None
    row = conn.execute(sa.text(f"""
        SELECT id, started_at FROM {SCHEMA}.runs
        WHERE command = :adopt AND outcome = 'succeeded' AND options -> 'adopted' ? :m
        ORDER BY id DESC LIMIT 1"""), {"adopt": ADOPT, "m": milestone}).one_or_none()
    return dict(row._mapping) if row else None


def adopted_final(conn: Connection, milestone: str) -> Final | None:
    """A milestone declared in place by ``toolkit adopt`` is final: its ledger was lost, so
    what it changed is not known and no rollback can undo it."""
    adopted = adopted_by(conn, milestone)
    if adopted is None:
        return None
    return Final(
        f"its ledger was lost and run {adopted['id']} (`{ADOPT}`, "
        f"{adopted['started_at']:%Y-%m-%d %H:%M:%S %Z}) declared it in place: what it changed "
        "is no longer recorded",
        "only the toolkit schema restored from a backup taken before it was lost brings its "
        "rollback back",
        details={"adopted_by_run": adopted["id"]})
