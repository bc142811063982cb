"""What the catalog says about one object: does it exist, is it valid, enabled, NOT NULL.

One module answers these for revisions, milestones, DDL capture and the fingerprint (each
had its own copy). Every function reads ``pg_catalog`` in the caller's transaction, and a
name that does not resolve is an answer (``False`` or ``None``), never an error. The
``*_sql`` forms return a query for a schema change's "already done?" test, which is plain
SQL text; names go in as quoted literals.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def literal(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def quoted(identifier: str) -> str:
    """An identifier as PostgreSQL's ``quote_ident`` would write it (plain when it can be)."""
    plain = identifier.isidentifier() and identifier == identifier.lower() and identifier.isascii()
    return identifier if plain else '"' + identifier.replace('"', '""') + '"'


def relation_exists(conn: Connection, name: str) -> bool:
    return conn.execute(sa.text("SELECT to_regclass(:r) IS NOT NULL"), {"r": name}).scalar_one()


def relation_exists_sql(name: str) -> str:
    return f"SELECT to_regclass({literal(name)}) IS NOT NULL"


def relation_gone_sql(name: str) -> str:
    return f"SELECT to_regclass({literal(name)}) IS NULL"


_COLUMN = ("SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass({t}) "
           "AND attname = {c} AND NOT attisdropped)")
_NOT_NULL = ("SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass({t}) "
             "AND attname = {c} AND NOT attisdropped")


def column_exists(conn: Connection, table: str, column: str) -> bool:
    return conn.execute(sa.text(_COLUMN.format(t=":t", c=":c")), {"t": table, "c": column}).scalar_one()


def column_exists_sql(table: str, column: str) -> str:
    return _COLUMN.format(t=literal(table), c=literal(column))


def column_gone_sql(table: str, column: str) -> str:
    return f"SELECT NOT ({column_exists_sql(table, column)})"


def column_not_null(conn: Connection, table: str, column: str) -> bool | None:
    """True or False; None when the column is not there."""
    return conn.execute(sa.text(_NOT_NULL.format(t=":t", c=":c")), {"t": table, "c": column}).scalar()


def column_not_null_sql(table: str, column: str) -> str:
    return _NOT_NULL.format(t=literal(table), c=literal(column))


def index_valid(conn: Connection, index: str) -> bool | None:
    """True when valid, False when INVALID (an interrupted CONCURRENTLY build), None when missing."""
    return conn.execute(sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:i)"),
                        {"i": index}).scalar()


def index_valid_sql(index: str) -> str:
    return (f"SELECT COALESCE((SELECT indisvalid FROM pg_index "
            f"WHERE indexrelid = to_regclass({literal(index)})), false)")


def trigger_enabled(conn: Connection, table: str, trigger: str) -> str | None:
    """``pg_trigger.tgenabled`` ('O' or 'A' when it fires), None when there is no such trigger."""
    return conn.execute(sa.text(
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :g"),
        {"t": table, "g": trigger}).scalar()


def triggers_present(conn: Connection, names: tuple[str, ...]) -> list[str]:
    """Which of these trigger names exist on any table."""
    return list(conn.execute(sa.text("SELECT DISTINCT tgname FROM pg_trigger WHERE tgname = ANY(:n) "
                                     "ORDER BY 1"), {"n": list(names)}).scalars())


def triggers_gone_sql(names: tuple[str, ...]) -> str:
    listed = ", ".join(literal(n) for n in names)
    return f"SELECT NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname IN ({listed}))"


def constraint_validated(conn: Connection, table: str, constraint: str) -> bool | None:
    """True when validated, False when NOT VALID, None when missing."""
    return conn.execute(sa.text(
        "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass(:t) AND conname = :c"),
        {"t": table, "c": constraint}).scalar()


def constraint_exists_sql(constraint: str, *, validated: bool = False) -> str:
    also = " AND convalidated" if validated else ""
    return f"SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = {literal(constraint)}{also})"
