"""Post-conditions read from the catalog (:mod:`toolkit.catalog`), as checks with a remedy."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine.results import Check


def rerun(milestone: str) -> str:
    return f"run `toolkit migrate {milestone}`"


def remedy(ok: bool, milestone: str, why: str = "") -> str | None:
    """The remedy of a check that failed: run the milestone again (``why`` says what that does)."""
    return None if ok else rerun(milestone) + (f" ({why})" if why else "")


def index_valid(conn: Connection, index: str, milestone: str) -> Check:
    valid = catalog.index_valid(conn, index)
    detail = {True: "valid", False: "INVALID (an interrupted build)", None: "missing"}[valid]
    return Check(name=f"{index} is valid", ok=bool(valid), detail=detail,
                 remedy=remedy(bool(valid), milestone, "an invalid index is rebuilt"))


def trigger_in_place(conn: Connection, table: str, trigger: str, milestone: str) -> Check:
    enabled = catalog.trigger_enabled(conn, table, trigger)
    ok = enabled in ("O", "A")
    return Check(name=f"{trigger} is in place", ok=ok,
                 detail="enabled" if ok else ("disabled" if enabled else "missing"),
                 remedy=remedy(ok, milestone))


def constraint_validated(conn: Connection, table: str, constraint: str, milestone: str) -> Check:
    validated = catalog.constraint_validated(conn, table, constraint)
    return Check(name=f"{constraint} is validated", ok=bool(validated),
                 detail={True: "validated", False: "NOT VALID yet", None: "missing"}[validated],
                 remedy=remedy(bool(validated), milestone))
