"""A resume that finds the database earlier than the run left it: a lossy failover, said.

With asynchronous replication a promoted replica lacks the batches the old primary had
committed but not yet sent. Each batch commits with its checkpoint, so nothing is lost
for good: the resumed run finds the older checkpoint and does them again. But the
operator should know that committed work went back in time. The database itself cannot
tell (its history went back too); the run that committed them can: it remembers the key
of every batch it committed, and the server it committed them on (system identifier and
timeline). When it resumes (``--reconnect``) it compares them with the checkpoints it
finds, says how many batches went back and will be done again, and history records it in
the resumed run's options (``went_back``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from toolkit.engine.unrecorded import take_note, write_note
from toolkit.schema.migrations import own_schema_exists
from toolkit.schema.own import SCHEMA

NOTE = ".committed"

# The timeline is the first 8 hex digits of the current WAL file's name (pg_walfile_name
# is refused during recovery; a run writes on a primary). pg_control_system() may need
# privileges a role lacks: then the identity is not known and only checkpoints are compared.
_IDENTITY = """
    SELECT (SELECT system_identifier::text FROM pg_control_system()),
           ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"""


def server_identity(conn: Connection) -> tuple[str, int] | None:
    """(system identifier, timeline) of the server ``conn`` is on, or None when unreadable."""
    try:
        with conn.begin_nested():
            row = conn.execute(sa.text(_IDENTITY)).one()
        return str(row[0]), int(row[1])
    except DBAPIError:
        return None


@dataclass
class Memory:
    """What this process committed: each batch's last key by (milestone, step), and the
    server it was on."""

    committed: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    server: tuple[str, int] | None = None
    runs: set[int] = field(default_factory=set)  # the runs that committed them

    def remember(self, milestone: str, step: str, key: int) -> None:
        self.committed.setdefault((milestone, step), []).append(key)

    # -- across processes: a run that stopped (exit 75) leaves it for the next one ---------
    def save(self, url: URL) -> None:
        if any(self.committed.values()):
            write_note(url, NOTE, {"committed": [[m, s, keys] for (m, s), keys in self.committed.items()],
                                   "server": list(self.server) if self.server else None,
                                   "runs": sorted(self.runs)})

    def load(self, url: URL) -> None:
        """What a run before this one, from this machine, committed and could not check."""
        note = take_note(url, NOTE)
        if not note or self.committed:
            return
        try:
            for milestone, step, keys in note.get("committed", []):
                self.committed[(str(milestone), str(step))] = [int(k) for k in keys]
            server = note.get("server")
            self.server = (str(server[0]), int(server[1])) if server else None
            self.runs = {int(r) for r in note.get("runs", [])}
        except (TypeError, ValueError, IndexError):
            self.committed, self.server, self.runs = {}, None, set()

    def check(self, conn: Connection, milestone: str) -> dict[str, Any] | None:
        """At the start of an attempt: the batches of ``milestone`` this process committed
        that the database no longer has, by step, and the server change, if any; None when
        nothing went back. Forgets what went back (the attempt does it again)."""
        now = server_identity(conn)
        before, self.server = self.server, now or self.server
        steps: dict[str, int] = {}
        for (name, step), keys in self.committed.items():
            if name != milestone or not keys or not own_schema_exists(conn):
                continue
            found = conn.execute(sa.text(f"""
                SELECT last_key, completed_at, run_id FROM {SCHEMA}.checkpoints
                WHERE milestone = :m AND step = :s"""), {"m": name, "s": step}).one_or_none()
            if found is not None and (found.completed_at is not None or (
                    found.run_id is not None and found.run_id not in self.runs
                    and found.run_id > max(self.runs, default=0))):
                continue  # done since, or a later run went on from there
            at = (found.last_key or 0) if found is not None else 0
            lost = [key for key in keys if key > at]
            if lost:
                steps[step] = len(lost)
                self.committed[(name, step)] = [key for key in keys if key <= at]
        moved = before is not None and now is not None and now != before
        if not steps and not moved:
            return None
        report: dict[str, Any] = {"batches": sum(steps.values()), "steps": steps}
        if moved and before is not None and now is not None:
            report["timeline"] = [before[1], now[1]]
            if before[0] != now[0]:
                report["system_identifier"] = [before[0], now[0]]
        return report


def said(milestone: str, report: dict[str, Any]) -> str:
    """The warning a resumed run gives."""
    where = ""
    if "system_identifier" in report:
        where = (f"; the database is now another server (system identifier {report['system_identifier'][0]} "
                 f"→ {report['system_identifier'][1]}: restored or rebuilt?)")
    elif "timeline" in report:
        where = (f"; the server is on timeline {report['timeline'][1]} (was {report['timeline'][0]}): "
                 "a replica was promoted")
    n = report["batches"]
    if not n:
        return f"{milestone}: resumed on another server{where}; every batch this run committed is there"
    steps = ", ".join(f"{step} {count}" for step, count in report["steps"].items())
    return (f"{milestone}: {n} batch{'es' if n != 1 else ''} this run committed went back in time "
            f"({steps}): the database it resumed on had not received them (asynchronous "
            f"replication){where}; they will be done again")
