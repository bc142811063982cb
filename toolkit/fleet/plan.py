"""``fleet plan``: every database's status and next milestone's plan, read-only, at once.

Each database is read with the same library calls ``toolkit status`` and ``toolkit plan``
make (:meth:`Inspector.status`, :meth:`Inspector.plan`), in their one REPEATABLE READ, READ ONLY
transaction, from a thread pool: a fleet's plan costs about its slowest database, not
their sum. A database that cannot be planned (unreachable, not GitLab's, a variable not
set) is a row with its one-line error and the exit code ``toolkit plan`` would have given,
never the end of the others.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from toolkit import milestones
from toolkit.db import classify, create_engine
from toolkit.engine import state
from toolkit.engine.inspection import Inspector
from toolkit.engine.results import MilestoneState
from toolkit.errors import ExitCode, ToolkitError
from toolkit.fleet import connect
from toolkit.fleet.inventory import Database, Fleet


@dataclass
class DatabasePlan:
    """One row of the fleet's plan (``--json`` gives it whole)."""

    database: str
    wave: str
    source: str
    exit_code: int = 0
    error: str | None = None
    gitlab_schema: str | None = None  # GitLab's newest schema_migrations version
    states: dict[str, str] = field(default_factory=dict)
    next_milestone: str | None = None
    rows_to_change: int | None = None
    anomalies: int | None = None
    blocking_anomalies: int | None = None
    gate_ok: bool | None = None
    measured_rows_per_s: float | None = None  # from this database's own completed runs
    estimate_s: float | None = None
    estimate_from: str | None = None  # "own runs" or the database whose rate was used
    seconds: float = 0.0  # how long the plan itself took

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_one(database: Database, read_timeout_ms: int | None = None) -> DatabasePlan:
    """The row of one database; every expected failure becomes the row's error."""
    row = DatabasePlan(database.name, database.wave, database.describe_source())
    started = time.monotonic()
    engine = None
    where = database.name
    secrets: tuple[str, ...] = ()
    try:
        target = connect.target(database)
        where, secrets = target.describe(), target.secrets
        engine = create_engine(target, read_timeout=read_timeout_ms)
        _read(Inspector(engine, milestones.plan()), row)
    except ToolkitError as exc:
        row.error, row.exit_code = _clean(exc.one_line(), secrets), int(exc.exit_code)
    except DBAPIError as exc:
        failure = classify(exc, where, secrets)
        row.error, row.exit_code = _clean(failure.one_line(), secrets), int(failure.exit_code)
    except Exception as exc:  # a bug on one database must not hide the others' plans
        row.error = _clean(f"Unexpected error: {type(exc).__name__}: {exc}", secrets)
        row.exit_code = int(ExitCode.INTERNAL)
    finally:
        if engine is not None:
            engine.dispose()
        row.seconds = round(time.monotonic() - started, 3)
    return row


def _clean(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _read(inspector: Inspector, row: DatabasePlan) -> None:
    report = inspector.status()  # refuses (exit 3) a database whose ML tables are not GitLab's
    row.states = {entry["milestone"]: entry["state"] for entry in report}
    pending = [entry["milestone"] for entry in report if entry["state"] != MilestoneState.VERIFIED]
    with inspector.engine.connect() as conn:
        row.gitlab_schema = _gitlab_schema(conn)
        row.measured_rows_per_s = _measured_rate(conn)
    if not pending:
        row.rows_to_change, row.anomalies, row.blocking_anomalies = 0, 0, 0
        return
    row.next_milestone = pending[0]
    result = inspector.plan(milestones.get(pending[0]))
    row.gate_ok = result.gate.ok
    row.rows_to_change = result.rows
    found = [a for step in result.steps for a in step.anomalies]
    row.anomalies = sum(a.count for a in found)
    row.blocking_anomalies = sum(a.count for a in found if a.blocking)


def _gitlab_schema(conn: sa.Connection) -> str | None:
    exists = conn.execute(sa.text("SELECT to_regclass('schema_migrations') IS NOT NULL")).scalar_one()
    if not exists:
        return None
    return conn.execute(sa.text("SELECT max(version) FROM schema_migrations")).scalar_one()


def _measured_rate(conn: sa.Connection) -> float | None:
    """Rows a second over this database's completed runs that changed rows."""
    runs = [r for r in state.history(conn, limit=50)
            if r["outcome"] == "succeeded" and r["finished_at"] and r["rows_by_step"]]
    rows = sum(sum(r["rows_by_step"].values()) for r in runs)
    seconds = sum((r["finished_at"] - r["started_at"]).total_seconds() for r in runs)
    return round(rows / seconds, 1) if rows and seconds > 0 else None


def estimate(rows: list[DatabasePlan]) -> None:
    """Each row's time at its own measured rate, else at the fleet's median measured rate
    (the canary's, once it ran): what the next waves will take, from what the first did."""
    measured = {r.database: r.measured_rows_per_s for r in rows if r.measured_rows_per_s}
    median = statistics.median(measured.values()) if measured else None
    for row in rows:
        if row.rows_to_change is None:
            continue
        rate = row.measured_rows_per_s or median
        if row.rows_to_change == 0:
            row.estimate_s, row.estimate_from = 0.0, None
        elif rate:
            row.estimate_s = round(row.rows_to_change / rate, 1)
            row.estimate_from = "own runs" if row.measured_rows_per_s else \
                f"fleet median of {len(measured)} database(s)"


def plan_fleet(fleet: Fleet, concurrency: int, read_timeout_ms: int | None = None,
               on_done: Callable[[DatabasePlan], None] | None = None) -> list[DatabasePlan]:
    """Every database's row, in inventory order, ``concurrency`` databases at a time."""
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fleet-plan") as pool:
        futures = [pool.submit(plan_one, d, read_timeout_ms) for d in fleet.databases]
        rows = []
        for future in futures:
            rows.append(future.result())
            if on_done is not None:
                on_done(rows[-1])
    estimate(rows)
    return rows
