"""A toolkit schema that is gone or unreadable while GitLab's tables show its milestones' work.

Every reader of the toolkit's state takes a missing schema for a database the toolkit never
touched ("not started"): right for a fresh database, wrong after a ``DROP SCHEMA toolkit``
or a restore that left it out. Then ``status`` would say "not started" beside a
``model_id`` column that milestone 2 added, and ``migrate`` would be refused for reasons
that have nothing to do with it. This module tells the two apart from GitLab's own
catalog (the columns the milestones add, the tables and columns they drop) and names the
state, so every command refuses (exit 3) until the operator restores the schema from a
backup or declares what is in place (``toolkit adopt --yes``, which records it and makes
those milestones final: what they changed is no longer known, so no rollback can undo it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from toolkit.catalog import column_exists, relation_exists
from toolkit.engine.plan import Final, MilestonePlan
from toolkit.engine.results import STARTED, MilestoneState
from toolkit.errors import PreconditionRefused
from toolkit.schema.migrations import applied_revisions, own_schema_exists
from toolkit.schema.own import SCHEMA, VERSION_TABLE

ADOPT = "toolkit adopt"


def traces(conn: Connection, plan: MilestonePlan) -> dict[str, list[str]]:
    """For each milestone whose changes GitLab's tables show, what shows them. Nothing on a
    database that is not GitLab's (the tables no milestone drops are not all there): its
    missing tables are no milestone's doing, and preflight names them."""
    dropped = {table for milestone in plan for table in milestone.drops}
    if not all(relation_exists(conn, table) for table in plan.reads if table not in dropped):
        return {}
    found: dict[str, list[str]] = {}
    for milestone in plan:
        seen = [f"{added} exists" for added in milestone.adds_columns
                if column_exists(conn, *added.split(".", 1))]
        seen += [f"{table} is gone" for table in milestone.drops if not relation_exists(conn, table)]
        seen += [f"{dropped} is gone" for dropped in milestone.drops_columns
                 if relation_exists(conn, dropped.split(".", 1)[0])
                 and not column_exists(conn, *dropped.split(".", 1))]
        if seen:
            found[milestone.name] = seen
    return found


@dataclass(frozen=True)
class LedgerLost:
    what: str  # what is wrong with the toolkit's schema
    in_place: dict[str, list[str]]  # milestone -> what GitLab's tables show of it

    def described(self) -> str:
        return "; ".join(f"{name} ({', '.join(seen)})" for name, seen in self.in_place.items())

    def refusal(self) -> PreconditionRefused:
        names = list(self.in_place)
        return PreconditionRefused(
            f"The toolkit's ledger is lost: {self.what}, but GitLab's tables show changes of "
            f"{joined(names)} in place: {self.described()}. What the ledger recorded (converted "
            f"packages, created models, copied tags, milestone 4's archive, the runs) went with it: "
            f"{joined(names)} can no longer be rolled back, and nothing is written until the state "
            "is known",
            "restore the toolkit schema from a backup taken before it was lost (pg_restore "
            f"--schema={SCHEMA}), or declare what is in place with `{ADOPT} --yes` (records "
            f"{joined(names)} as applied, for good: they can never be rolled back by the toolkit)",
            details={"ledger": self.what, "in_place": self.in_place})

    def as_dict(self) -> dict[str, Any]:
        return {"ledger": self.what, "in_place": self.in_place}


def ledger_lost(conn: Connection, plan: MilestonePlan) -> LedgerLost | None:
    """The toolkit's schema or its milestones table is gone or unreadable (or records none
    of the milestones whose changes are in place) although GitLab's tables show them; None
    when the ledger is in order or nothing shows (a database the toolkit never touched)."""
    found = traces(conn, plan)
    if not found:
        return None
    if not schema_exists(conn):
        return LedgerLost(f"the schema {SCHEMA} is gone", found)
    if not own_schema_exists(conn):
        return LedgerLost(f"the table {SCHEMA}.{VERSION_TABLE} is gone", found)
    if not relation_exists(conn, f"{SCHEMA}.milestones"):
        return LedgerLost(f"the table {SCHEMA}.milestones is gone", found)
    try:
        with conn.begin_nested():
            recorded = {row[0]: row[1] for row in conn.execute(sa.text(
                f"SELECT milestone, state FROM {SCHEMA}.milestones"))}
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        return LedgerLost(f"the table {SCHEMA}.milestones cannot be read ({first})", found)
    if not any(recorded.get(name) in STARTED or recorded.get(name) == MilestoneState.ROLLED_BACK
               for name in found) and not _made_by_own_revisions(conn, found):
        return LedgerLost(f"the table {SCHEMA}.milestones records none of them", found)
    return None


def _made_by_own_revisions(conn: Connection, found: dict[str, list[str]]) -> bool:
    """Whether the toolkit's own version table records a schema change of one of those
    milestones (``m2_…``, ``m3_…``): its migrations made them, as a run that was stopped
    before it recorded its milestone does (or an operator applying one revision by hand),
    and the ledger is whole."""
    prefixes = tuple(f"m{name.rsplit('-', 1)[-1]}_" for name in found)
    return any(revision.startswith(prefixes) for revision in applied_revisions(conn))


def schema_exists(conn: Connection) -> bool:
    return bool(conn.execute(sa.text("SELECT to_regnamespace(:s) IS NOT NULL"), {"s": SCHEMA}).scalar_one())


def refuse_lost_ledger(conn: Connection, plan: MilestonePlan) -> None:
    if (lost := ledger_lost(conn, plan)) is not None:
        raise lost.refusal()


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


def joined(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
