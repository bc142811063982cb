"""Read, from the catalog, the DDL of what milestone 4 drops, so rollback can rebuild it.

A real GitLab database's constraint names, defaults and sequence settings are whatever its
history made them; the toolkit's transcription of the schema cannot know them all. So the
definitions are read from ``pg_catalog`` (``pg_get_constraintdef``, ``pg_get_indexdef``,
``pg_get_triggerdef``, ``pg_get_functiondef``, ``format_type``, ``pg_sequence``) before
anything is dropped, and replayed by phase, in dependency order, by the rollback.

Each statement is recorded with the table it belongs to and the object it makes, both as
they are written in SQL (``quote_ident``, ``regclass::text``): the rollback composes its
``DROP … IF EXISTS`` and ``VALIDATE`` statements from those, never by reading a statement
back word by word.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import literal
from toolkit.names import M4_ARCHIVED_DDL, M4_DROPPED_COLUMN, M4_DROPPED_TABLES, TRANSITION_TRIGGERS

# Phases, in the order the rollback replays them.
PHASES = (
    "sequences",          # CREATE SEQUENCE
    "tables",             # CREATE TABLE with columns, defaults, NOT NULL
    "owned_by",           # ALTER SEQUENCE ... OWNED BY
    "primary_keys",       # so restored rows can be upserted
    # (rows are restored here)
    "setval",             # sequence positions
    "constraints",        # UNIQUE and CHECK constraints of the rebuilt tables
    "indexes",            # their other indexes
    "candidate_column",   # ALTER TABLE ml_candidates ADD COLUMN experiment_id (nullable)
    # (experiment_id backfilled, then NOT NULL)
    "candidate_not_null",  # the column's NOT NULL, if it had one
    "candidate_indexes",  # indexes on the column, rebuilt CONCURRENTLY
    "foreign_keys",       # every foreign key to or from what was dropped, NOT VALID then VALIDATE
    "functions",          # trigger functions
    "triggers",           # triggers of the rebuilt tables, and the transition triggers
)


# The name of a column's NOT NULL constraint (``a`` is its pg_attribute row). PostgreSQL 18
# keeps NOT NULL as a named constraint in pg_constraint (contype 'n'), whose name a
# database's history may have made other than the default <table>_<column>_not_null; the
# rebuild gives it back. Before 18 there is no such row (NULL), and NOT NULL has no name.
NOT_NULL_NAME = """(SELECT quote_ident(n.conname) FROM pg_constraint n WHERE n.conrelid = a.attrelid
                    AND n.contype = 'n' AND n.conkey = ARRAY[a.attnum]) AS not_null_name"""


@dataclass(frozen=True, kw_only=True)
class Statement:
    phase: str
    table: str  # the table it belongs to, as written in SQL
    name: str  # the object it makes (sequence, constraint, index, trigger ...), as written in SQL
    sql: str


def _rows(conn: Connection, sql: str, **params: object) -> list[sa.Row]:
    return list(conn.execute(sa.text(sql), params))


def capture(conn: Connection) -> list[Statement]:
    """Every statement the rollback replays, read from the catalog before anything is dropped."""
    out: list[Statement] = []
    for table in M4_DROPPED_TABLES:
        out += _dropped_table(conn, table)
    attnum, column_statements = _dropped_column(conn)
    out += column_statements
    out += _foreign_keys(conn, attnum)
    for owner, trigger in TRANSITION_TRIGGERS:
        out += _triggers(conn, owner, trigger)
    return _dedupe(out)


def _dropped_table(conn: Connection, table: str) -> list[Statement]:
    """A table milestone 4 drops: its sequences, columns, constraints, indexes, triggers."""
    out = _sequences(conn, table)
    out.append(Statement(phase="tables", table=table, name=table, sql=_create_table(conn, table)))
    for con in _rows(conn, """
            SELECT quote_ident(conname) AS name, contype, pg_get_constraintdef(oid) AS definition
            FROM pg_constraint
            WHERE conrelid = CAST(:t AS regclass) AND contype IN ('p', 'u', 'c') ORDER BY conname""",
                     t=table):
        out.append(Statement(phase="primary_keys" if con.contype == "p" else "constraints",
                             table=table, name=con.name,
                             sql=f"ALTER TABLE {table} ADD CONSTRAINT {con.name} {con.definition}"))
    for index in _rows(conn, """
            SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
            FROM pg_index i
            WHERE i.indrelid = CAST(:t AS regclass)
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
            ORDER BY i.indexrelid::regclass::text""", t=table):
        out.append(Statement(phase="indexes", table=table, name=index.name, sql=index.definition))
    return out + _triggers(conn, table, None)


def _dropped_column(conn: Connection) -> tuple[int, list[Statement]]:
    """``ml_candidates.experiment_id``: its definition, NOT NULL, indexes and CHECK
    constraints; with its attnum (its foreign keys are found by it)."""
    table, column = M4_DROPPED_COLUMN
    col = _rows(conn, f"""
        SELECT format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull, a.attnum, {NOT_NULL_NAME}
        FROM pg_attribute a
        WHERE a.attrelid = CAST(:t AS regclass) AND a.attname = :c AND NOT a.attisdropped""",
                t=table, c=column)[0]
    out = [Statement(phase="candidate_column", table=table, name=column,
                     sql=f"ALTER TABLE {table} ADD COLUMN {column} {col.type}")]
    if col.attnotnull and col.not_null_name:  # PostgreSQL 18 and later: under its own name
        out.append(Statement(phase="candidate_not_null", table=table, name=col.not_null_name,
                             sql=f"ALTER TABLE {table} ADD CONSTRAINT {col.not_null_name} NOT NULL {column}"))
    elif col.attnotnull:
        out.append(Statement(phase="candidate_not_null", table=table, name=column,
                             sql=f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL"))
    for index in _rows(conn, """
            SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
            FROM pg_index i
            WHERE i.indrelid = CAST(:t AS regclass) AND :n = ANY(i.indkey::int2[])
            ORDER BY i.indexrelid::regclass::text""", t=table, n=col.attnum):
        concurrent = index.definition.replace(" INDEX ", " INDEX CONCURRENTLY ", 1)
        out.append(Statement(phase="candidate_indexes", table=table, name=index.name, sql=concurrent))
    for con in _rows(conn, """
            SELECT quote_ident(conname) AS name, pg_get_constraintdef(oid) AS definition FROM pg_constraint
            WHERE conrelid = CAST(:t AS regclass) AND contype = 'c' AND :n = ANY(conkey)""",
                     t=table, n=col.attnum):
        out.append(Statement(phase="constraints", table=table, name=con.name,
                             sql=f"ALTER TABLE {table} ADD CONSTRAINT {con.name} {con.definition}"))
    return col.attnum, out


def _foreign_keys(conn: Connection, attnum: int) -> list[Statement]:
    """Every foreign key from or to the dropped tables, and from the dropped column."""
    table, _ = M4_DROPPED_COLUMN
    return [Statement(phase="foreign_keys", table=fk.tbl, name=fk.name,
                      sql=f"ALTER TABLE {fk.tbl} ADD CONSTRAINT {fk.name} {fk.definition}")
            for fk in _rows(conn, """
            SELECT c.conrelid::regclass::text AS tbl, quote_ident(c.conname) AS name,
                   pg_get_constraintdef(c.oid) AS definition
            FROM pg_constraint c
            WHERE c.contype = 'f' AND (
                c.conrelid = ANY(CAST(:tables AS regclass[]))
                OR c.confrelid = ANY(CAST(:tables AS regclass[]))
                OR (c.conrelid = CAST(:t AS regclass) AND :n = ANY(c.conkey)))
            ORDER BY 1, c.conname""", tables=list(M4_DROPPED_TABLES), t=table, n=attnum)]


def _sequences(conn: Connection, table: str) -> list[Statement]:
    out = []
    for seq in _rows(conn, """
            SELECT s.seqrelid::regclass::text AS name, format_type(s.seqtypid, NULL) AS type,
                   s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
                   quote_ident(a.attname) AS column_name
            FROM pg_depend d JOIN pg_sequence s ON s.seqrelid = d.objid
            JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
            WHERE d.refobjid = CAST(:t AS regclass) AND d.deptype = 'a'
              AND d.classid = 'pg_class'::regclass""",
                         t=table):
        last_value, is_called = conn.execute(sa.text(f"SELECT last_value, is_called FROM {seq.name}")).one()
        out.append(Statement(phase="sequences", table=table, name=seq.name, sql=(
            f"CREATE SEQUENCE {seq.name} AS {seq.type} START WITH {seq.seqstart} INCREMENT BY "
            f"{seq.seqincrement} MINVALUE {seq.seqmin} MAXVALUE {seq.seqmax} CACHE {seq.seqcache}"
            f"{' CYCLE' if seq.seqcycle else ''}")))
        out.append(Statement(phase="owned_by", table=table, name=seq.name,
                             sql=f"ALTER SEQUENCE {seq.name} OWNED BY {table}.{seq.column_name}"))
        called = str(is_called).lower()
        out.append(Statement(phase="setval", table=table, name=seq.name,
                             sql=f"SELECT setval({literal(seq.name)}, {last_value}, {called})"))
    return out


def _create_table(conn: Connection, table: str) -> str:
    columns = []
    for col in _rows(conn, f"""
            SELECT quote_ident(a.attname) AS name, format_type(a.atttypid, a.atttypmod) AS type,
                   a.attnotnull, pg_get_expr(d.adbin, d.adrelid) AS default_expr, {NOT_NULL_NAME}
            FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum""", t=table):
        definition = f"    {col.name} {col.type}"
        if col.default_expr is not None:
            definition += f" DEFAULT {col.default_expr}"
        if col.attnotnull and col.not_null_name:
            definition += f" CONSTRAINT {col.not_null_name} NOT NULL"
        elif col.attnotnull:
            definition += " NOT NULL"
        columns.append(definition)
    return f"CREATE TABLE {table} (\n" + ",\n".join(columns) + "\n)"


def _triggers(conn: Connection, table: str, only: str | None) -> list[Statement]:
    out = []
    for trig in _rows(conn, """
            SELECT quote_ident(t.tgname) AS name, t.tgfoid::regproc::text AS function,
                   pg_get_triggerdef(t.oid) AS definition, pg_get_functiondef(t.tgfoid) AS fn
            FROM pg_trigger t WHERE t.tgrelid = CAST(:t AS regclass) AND NOT t.tgisinternal
              AND (CAST(:only AS text) IS NULL OR t.tgname = :only)
              AND t.tgname NOT LIKE 'toolkit%' ORDER BY t.tgname""", t=table, only=only):
        out.append(Statement(phase="functions", table=table, name=trig.function, sql=trig.fn.strip()))
        out.append(Statement(phase="triggers", table=table, name=trig.name, sql=trig.definition))
    return out


def _dedupe(statements: list[Statement]) -> list[Statement]:
    seen, out = set(), []
    for s in statements:
        if (s.phase, s.sql) not in seen:
            seen.add((s.phase, s.sql))
            out.append(s)
    return sorted(out, key=lambda s: PHASES.index(s.phase))


# -- recording and reading back ------------------------------------------------------------
def record(conn: Connection) -> None:
    """Capture and store the DDL (replacing what an interrupted capture left)."""
    conn.execute(sa.text(f"DELETE FROM {M4_ARCHIVED_DDL}"))
    for ordinal, statement in enumerate(capture(conn), start=1):
        conn.execute(sa.text(f"""
            INSERT INTO {M4_ARCHIVED_DDL} (ordinal, phase, table_name, object_name, statement)
            VALUES (:o, :p, :t, :n, :s)"""),
            {"o": ordinal, "p": statement.phase, "t": statement.table, "n": statement.name,
             "s": statement.sql})


RECORDED_SQL = (f"SELECT phase, table_name, object_name, statement FROM {M4_ARCHIVED_DDL} "
                "WHERE phase = ANY(:phases) ORDER BY ordinal")


def recorded(conn: Connection, *phases: str) -> list[Statement]:
    """The recorded statements of these phases, in order; none before a capture (or when the
    toolkit's own schema is not there yet)."""
    if not conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": M4_ARCHIVED_DDL}).scalar_one():
        return []
    return [Statement(phase=r.phase, table=r.table_name, name=r.object_name, sql=r.statement)
            for r in conn.execute(sa.text(RECORDED_SQL), {"phases": list(phases)})]


def statements(*phases: str) -> tuple[str, Callable[[Connection], list[str]]]:
    """For a rebuild action: the query that yields these phases' statements (what ``toolkit
    sql`` shows without a database), and the function that reads them."""
    query = RECORDED_SQL.replace(":phases", "ARRAY[" + ", ".join(literal(p) for p in phases) + "]")
    return query, lambda conn: [s.sql for s in recorded(conn, *phases)]
