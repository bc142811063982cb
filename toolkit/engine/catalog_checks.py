"""Post-conditions read from the catalog, shared by the milestones' schema steps."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine.results import Check


def _rerun(milestone: str) -> str:
    return f"run `toolkit migrate {milestone}`"


def index_valid(conn: Connection, index: str, milestone: str) -> Check:
    valid = conn.execute(sa.text(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:i)"), {"i": index}).scalar()
    detail = {True: "valid", False: "INVALID (an interrupted build)", None: "missing"}[valid]
    return Check(name=f"{index} is valid", ok=bool(valid), detail=detail,
                 remedy=None if valid else f"{_rerun(milestone)} (an invalid index is rebuilt)")


def trigger_in_place(conn: Connection, table: str, trigger: str, milestone: str) -> Check:
    enabled = conn.execute(sa.text(
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :g"),
        {"t": table, "g": trigger}).scalar()
    ok = enabled in ("O", "A")
    return Check(
        name=f"{trigger} is in place",
        ok=ok,
        detail="enabled" if ok else ("disabled" if enabled else "missing"),
        remedy=None if ok else _rerun(milestone),
    )


def constraint_validated(conn: Connection, table: str, constraint: str, milestone: str) -> Check:
    validated = conn.execute(sa.text(
        "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass(:t) AND conname = :c"),
        {"t": table, "c": constraint}).scalar()
    return Check(name=f"{constraint} is validated", ok=bool(validated),
                 detail={True: "validated", False: "NOT VALID yet", None: "missing"}[validated],
                 remedy=None if validated else _rerun(milestone))
