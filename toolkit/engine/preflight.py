"""Checks before anything is written: is this GitLab's database, as the toolkit knows it,
on a primary, with the privileges the milestone needs? Each failure names the fix.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import types as t
from sqlalchemy.engine import Connection

from toolkit.engine.plan import MilestonePlan
from toolkit.errors import DatabaseProblem, PreconditionRefused
from toolkit.schema.gitlab import metadata as gitlab_metadata
from toolkit.schema.own import SCHEMA


def pg_type_name(column: sa.Column[Any]) -> str:
    """The column's type as PostgreSQL's format_type() spells it."""
    kind = column.type
    if isinstance(kind, t.BigInteger):
        return "bigint"
    if isinstance(kind, t.SmallInteger):
        return "smallint"
    if isinstance(kind, t.Integer):
        return "integer"
    if isinstance(kind, t.Text):
        return "text"
    if isinstance(kind, t.String):
        return f"character varying({kind.length})" if kind.length else "character varying"
    if isinstance(kind, t.DateTime):
        return "timestamp with time zone" if kind.timezone else "timestamp without time zone"
    if isinstance(kind, t.Float):
        return "double precision"
    if isinstance(kind, t.LargeBinary):
        return "bytea"
    if isinstance(kind, t.Uuid):
        return "uuid"
    raise TypeError(f"no PostgreSQL name known for {kind!r}")


def check_gitlab_database(conn: Connection, plan: MilestonePlan, *, columns: bool = True) -> None:
    """Refuse (exit 3) a database that is not GitLab's, as every command that reads one does,
    before it reads anything else. ``columns=False`` for commands that read only the
    toolkit's own schema (history, the archive): the tables must be there, but a GitLab
    upgrade that changed a column does not hide the toolkit's own records."""
    check_gitlab_schema(conn, plan.reads, may_be_gone=plan.may_be_gone(conn), columns=columns)


def check_gitlab_schema(conn: Connection, tables: tuple[str, ...], *, columns: bool = True,
                        may_be_gone: frozenset[str] = frozenset()) -> None:
    """Refuse unless every table exists with every expected column and type (extras are fine);
    with ``columns=False``, unless every table exists. ``may_be_gone``: tables and
    ``table.column`` a started milestone drops on purpose (the plan says which)."""
    found = conn.execute(sa.text("""
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname = ANY(:t)
    """), {"t": list(tables)}).all()
    found_columns: dict[str, dict[str, str]] = {}
    for table, column, type_name in found:
        found_columns.setdefault(table, {})[column] = type_name
    tables = tuple(name for name in tables if name not in may_be_gone)
    missing_tables = [name for name in tables if name not in found_columns]
    if missing_tables:
        database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        raise PreconditionRefused(
            f"Database {database!r} has no table {', '.join(missing_tables)}: it does not look like "
            "GitLab's database (or GitLab's ML tables are in another schema)",
            "check --database-url (GitLab's database is usually gitlabhq_production) and search_path",
        )
    if not columns:
        return
    problems = []
    for name in tables:
        for column in gitlab_metadata.tables[name].columns:
            actual = found_columns[name].get(column.name)
            expected = pg_type_name(column)
            if actual is None and f"{name}.{column.name}" in may_be_gone:
                continue
            if actual is None:
                problems.append(f"{name}.{column.name} is missing")
            elif actual != expected:
                problems.append(f"{name}.{column.name} is {actual}, expected {expected}")
    if problems:
        raise PreconditionRefused(
            "GitLab's schema differs from the one this toolkit knows: " + "; ".join(problems),
            "upgrade GitLab to a version with the expected schema (see gitlab-ml-schema.md), "
            "or report the difference; nothing was changed",
            details={"differences": problems},
        )


def check_writable(conn: Connection) -> None:
    if conn.execute(sa.text("SELECT pg_is_in_recovery()")).scalar_one():
        raise DatabaseProblem(
            "The database is a read-only replica (in recovery)", "point --database-url at the primary"
        )
    if conn.execute(sa.text("SELECT current_setting('transaction_read_only')")).scalar_one() == "on":
        raise DatabaseProblem(
            "Sessions of this user are read-only (default_transaction_read_only is on)",
            "use a role that may write, e.g. the one GitLab's migrations run as",
        )


def check_privileges(conn: Connection, updates: tuple[str, ...], reads: tuple[str, ...]) -> None:
    def allowed(sql: str, **params: str) -> bool:
        return bool(conn.execute(sa.text(f"SELECT {sql}"), params).scalar_one())

    missing = [f"SELECT on {table}" for table in reads
               if not allowed("has_table_privilege(:t, 'SELECT')", t=table)]
    missing += [f"UPDATE on {table}" for table in updates
                if not allowed("has_table_privilege(:t, 'UPDATE')", t=table)]
    if allowed("to_regnamespace(:s) IS NOT NULL", s=SCHEMA):
        if not allowed("has_schema_privilege(:s, 'CREATE')", s=SCHEMA):
            missing.append(f"CREATE on schema {SCHEMA}")
    elif not allowed("has_database_privilege(current_database(), 'CREATE')"):
        missing.append(f"CREATE on the database (to create schema {SCHEMA})")
    if missing:
        user = conn.execute(sa.text("SELECT current_user")).scalar_one()
        raise DatabaseProblem(
            f"Role {user!r} lacks privileges: {', '.join(missing)}",
            "run as the GitLab database owner (the role that runs GitLab's migrations)",
            details={"missing": missing},
        )
