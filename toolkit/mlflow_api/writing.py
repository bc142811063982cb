"""One MLflow write, one transaction: how ``toolkit mlflow serve --allow-writes`` writes
while the blueprint's milestones change the schema under it.

A write endpoint is a function ``(conn, ctx, params) -> answer`` (:data:`WriteFunction`);
:class:`Writer` runs it in a READ COMMITTED read-write transaction with the server's
``lock_timeout`` and ``statement_timeout``, in this order:

1. ``LOCK TABLE … IN ROW EXCLUSIVE MODE`` on the ML tables the endpoint writes (those that
   exist; the order is fixed, so two writes never deadlock on it). ROW EXCLUSIVE is what
   the INSERTs and UPDATEs would take anyway; taking it first means no schema change
   (it needs ACCESS EXCLUSIVE) can commit between reading the stage and writing. A schema
   change holding or queued for ACCESS EXCLUSIVE makes this wait at most
   ``lock_timeout``, then the answer is 503 ``TEMPORARILY_UNAVAILABLE`` with
   ``Retry-After``, which MLflow clients retry, and nothing was written;
2. the project (``find_project!``) and the stage (:func:`stages.stage_of`), read in the
   same transaction;
3. the endpoint, which records every row it writes (:func:`stages.record_write`).

A moment of the migration that takes no write (:class:`stages.WritesPaused`: milestone 4's
rollback, milestone 4's drop) is 503 at once; a stage that changed while the write waited
for its lock (:class:`stages.StageChanged`) runs the write again in the new stage.

The whole transaction is run again on a serialization failure or deadlock
(``40001``/``40P01``) and when the stage changed under it (``42P01``/``42703``: a table or
column dropped between the catalog read and the statement). A connection lost, a server
restarting or shutting down, a session killed: 503, as for reads. A value the database
refuses (a CHECK, a unique index, a NUL): GitLab's 400 ``INVALID_PARAMETER_VALUE`` (its
``rescue_from ActiveRecord::ActiveRecordError``). Never a 500 for any of these, never a
write half done: the transaction commits whole or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from toolkit.db import TIMEOUTS_OPTION
from toolkit.errors import redact
from toolkit.mlflow_api import stages
from toolkit.mlflow_api.errors import BUSY, CONFLICT, STAGE_CHANGED, UNAVAILABLE, ApiError, invalid_parameter
from toolkit.mlflow_api.projects import resolve_project
from toolkit.schema.gitlab import ML_TABLE_NAMES

WriteFunction = Callable[[Connection, stages.WriteContext, dict[str, Any]], dict[str, Any]]

ATTEMPTS = 5
# What a 503 asks the client to wait. MLflow's client (urllib3) honours it instead of its own
# backoff, up to MLFLOW_HTTP_REQUEST_MAX_RETRIES (7) times: its patience is 7 x Retry-After.
RETRY_AFTER_S = 2  # a lock wait: the schema change holding it is short
PAUSED_RETRY_AFTER_S = 10  # milestone 4 rolling back or between its drops: 70 s of patience


def tables_written(*names: str) -> Callable[[WriteFunction], WriteFunction]:
    """Declare the tables an endpoint may write, at any stage (locked before the stage is
    read). An endpoint without the declaration locks every ML table."""
    def mark(function: WriteFunction) -> WriteFunction:
        function.tables = names  # type: ignore[attr-defined]
        return function
    return mark


def lock_tables(conn: Connection, names: tuple[str, ...]) -> list[str]:
    """ROW EXCLUSIVE locks on those of ``names`` that exist, in name order; the locked ones."""
    present = [row[0] for row in conn.execute(sa.text(
        "SELECT t FROM unnest(CAST(:names AS text[])) t WHERE to_regclass(t) IS NOT NULL ORDER BY t"),
        {"names": sorted(set(names))})]
    if present:
        conn.execute(sa.text(f"LOCK TABLE {', '.join(_quoted(n) for n in present)} IN ROW EXCLUSIVE MODE"))
    return present


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def unavailable(message: str, retry_after_s: int = RETRY_AFTER_S) -> ApiError:
    return ApiError(503, "TEMPORARILY_UNAVAILABLE", message, headers=(("Retry-After", str(retry_after_s)),))


class Writer:
    """Runs write endpoints over ``engine``, one transaction each (see the module)."""

    def __init__(self, engine: Engine, *, timeouts: tuple[int, int], secrets: tuple[str, ...] = ()):
        self.engine = engine
        self.timeouts = timeouts
        self.secrets = secrets

    def write(self, function: WriteFunction, endpoint: str, project: str, base_url: str,
              params: dict[str, Any], user_id: int | None) -> dict[str, Any]:
        tables: tuple[str, ...] = getattr(function, "tables", ML_TABLE_NAMES)
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1
            try:
                with self.engine.connect() as conn:
                    conn = conn.execution_options(isolation_level="READ COMMITTED", postgresql_readonly=False,
                                                  **{TIMEOUTS_OPTION: self.timeouts})
                    with conn.begin():
                        lock_tables(conn, tables)
                        project_id = resolve_project(conn, project)
                        stage = stages.stage_of(conn)
                        ctx = stages.WriteContext(project_id, user_id, stage, base_url, endpoint)
                        try:
                            return function(conn, ctx, params)
                        except NotImplementedError:
                            raise ApiError(403, "FEATURE_DISABLED",
                                           f"{endpoint} is not served at this stage of the migration "
                                           f"({stage.value}) by this version of toolkit mlflow serve; "
                                           "nothing was written") from None
            except stages.WritesPaused as exc:
                raise unavailable(f"Writes wait while {exc}; nothing was written, try again",
                                  PAUSED_RETRY_AFTER_S) from None
            except stages.StageChanged as exc:
                if not last:
                    continue  # a schema change committed while the write waited: the new stage
                raise unavailable("The migration kept changing the schema under this write; nothing "
                                  "was written, try again") from exc
            except DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None) or ""
                if (code in CONFLICT or code in STAGE_CHANGED) and not last:
                    time.sleep(0.02 * 2**attempt)
                    continue
                raise self._refusal(exc, code) from exc
            except PoolTimeout as exc:
                raise unavailable("Every database connection of the server is busy; nothing was written, "
                                  "try again") from exc
        raise AssertionError("unreachable")

    def _refusal(self, exc: DBAPIError, code: str) -> ApiError:
        text = str(exc.orig).strip()
        first = redact(text.splitlines()[0] if text else "", self.secrets)
        if code in BUSY or code in CONFLICT or code in STAGE_CHANGED:
            why = BUSY.get(code, "the schema or other writes kept changing under it")
            return unavailable(f"The database did not take this write: {why} (a migration step may be "
                               f"changing the schema: {first}); nothing was written, try again")
        if code == "25006":  # a standby, or default_transaction_read_only
            return unavailable(f"The database is read-only just now ({first}); nothing was written, "
                               "try again")
        if (code.startswith(UNAVAILABLE) or exc.connection_invalidated
                or (not code and isinstance(exc.orig, psycopg.OperationalError))):
            return unavailable("The database connection was lost or the database is restarting "
                               f"({first}); the write was not confirmed, try again")
        if code.startswith(("22", "23")) or (not code and isinstance(exc.orig, psycopg.DataError)):
            # GitLab: rescue_from ActiveRecord::ActiveRecordError { invalid_parameter!(e.message) }
            return invalid_parameter(first)
        if code == "42501":
            return ApiError(403, "PERMISSION_DENIED",
                            f"The server's database role may not write this: {first}")
        return ApiError(500, "INTERNAL_ERROR", f"The write failed: {first}")
