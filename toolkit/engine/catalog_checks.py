"""Post-conditions read from the catalog, shared by the milestones' schema steps."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine.step import Check


def _rerun(milestone: str) -> str:
    return f"run `toolkit migrate {milestone}`"


def index_valid(conn: Connection, index: str, milestone: str) -> Check:
    valid = conn.execute(sa.text(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:i)"), {"i": index}).scalar()
    detail = {True: "valid", False: "INVALID (an interrupted build)", None: "missing"}[valid]
    return Check(f"{index} is valid", bool(valid), detail,
                 None if valid else f"{_rerun(milestone)} (an invalid index is rebuilt)")


def trigger_in_place(conn: Connection, table: str, trigger: str, milestone: str) -> Check:
    enabled = conn.execute(sa.text(
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :g"),
        {"t": table, "g": trigger}).scalar()
    ok = enabled in ("O", "A")
    return Check(f"{trigger} is in place", ok, "enabled" if ok else ("disabled" if enabled else "missing"),
                 None if ok else _rerun(milestone))


def constraint_validated(conn: Connection, table: str, constraint: str, milestone: str) -> Check:
    validated = conn.execute(sa.text(
        "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass(:t) AND conname = :c"),
        {"t": table, "c": constraint}).scalar()
    return Check(f"{constraint} is validated", bool(validated),
                 {True: "validated", False: "NOT VALID yet", None: "missing"}[validated],
                 None if validated else _rerun(milestone))
