"""Read, from the catalog, the DDL of what milestone 4 drops, so rollback can rebuild it.

A real GitLab database's constraint names, defaults and sequence settings are whatever its
history made them; the toolkit's transcription of the schema cannot know them all. So the
definitions are read from ``pg_catalog`` (``pg_get_constraintdef``, ``pg_get_indexdef``,
``pg_get_triggerdef``, ``pg_get_functiondef``, ``format_type``, ``pg_sequence``) before
anything is dropped, and replayed by phase, in dependency order, by the rollback.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

DROPPED_TABLES = ("ml_experiments", "ml_experiment_metadata")
DROPPED_COLUMN = ("ml_candidates", "experiment_id")
TRANSITION_TRIGGERS = (("ml_candidates", "trigger_ml_candidates_model_id_transition"),
                       ("ml_models", "trigger_ml_models_display_name_transition"))

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


@dataclass(frozen=True)
class Statement:
    phase: str
    sql: str


def _rows(conn: Connection, sql: str, **params: object) -> list[sa.Row]:
    return list(conn.execute(sa.text(sql), params))


def capture(conn: Connection) -> list[Statement]:
    out: list[Statement] = []
    tables = list(DROPPED_TABLES)
    for table in tables:
        out += _sequences(conn, table)
        out.append(Statement("tables", _create_table(conn, table)))
        for con in _rows(conn, """
                SELECT conname, contype, pg_get_constraintdef(oid) AS definition FROM pg_constraint
                WHERE conrelid = CAST(:t AS regclass) AND contype IN ('p', 'u', 'c') ORDER BY conname""",
                         t=table):
            phase = "primary_keys" if con.contype == "p" else "constraints"
            out.append(Statement(phase, f"ALTER TABLE {table} ADD CONSTRAINT {con.conname} {con.definition}"))
        for index in _rows(conn, """
                SELECT pg_get_indexdef(i.indexrelid) AS definition FROM pg_index i
                WHERE i.indrelid = CAST(:t AS regclass)
                  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
                ORDER BY i.indexrelid::regclass::text""", t=table):
            out.append(Statement("indexes", index.definition))
        out += _triggers(conn, table, None)

    # ml_candidates.experiment_id: its definition, indexes and constraints
    table, column = DROPPED_COLUMN
    col = _rows(conn, f"""
        SELECT format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull, a.attnum, {NOT_NULL_NAME}
        FROM pg_attribute a
        WHERE a.attrelid = CAST(:t AS regclass) AND a.attname = :c AND NOT a.attisdropped""",
                t=table, c=column)[0]
    out.append(Statement("candidate_column", f"ALTER TABLE {table} ADD COLUMN {column} {col.type}"))
    if col.attnotnull and col.not_null_name:  # PostgreSQL 18 and later: under its own name
        out.append(Statement("candidate_not_null",
                             f"ALTER TABLE {table} ADD CONSTRAINT {col.not_null_name} NOT NULL {column}"))
    elif col.attnotnull:
        out.append(Statement("candidate_not_null",
                             f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL"))
    for index in _rows(conn, """
            SELECT pg_get_indexdef(i.indexrelid) AS definition FROM pg_index i
            WHERE i.indrelid = CAST(:t AS regclass) AND :n = ANY(i.indkey::int2[])
            ORDER BY i.indexrelid::regclass::text""", t=table, n=col.attnum):
        concurrent = index.definition.replace(" INDEX ", " INDEX CONCURRENTLY ", 1)
        out.append(Statement("candidate_indexes", concurrent))
    for con in _rows(conn, """
            SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint
            WHERE conrelid = CAST(:t AS regclass) AND contype = 'c' AND :n = ANY(conkey)""",
                     t=table, n=col.attnum):
        out.append(Statement("constraints",
                             f"ALTER TABLE {table} ADD CONSTRAINT {con.conname} {con.definition}"))

    # every foreign key from or to the dropped tables, and from the dropped column
    for fk in _rows(conn, """
            SELECT c.conrelid::regclass::text AS tbl, c.conname, pg_get_constraintdef(c.oid) AS definition
            FROM pg_constraint c
            WHERE c.contype = 'f' AND (
                c.conrelid = ANY(CAST(:tables AS regclass[]))
                OR c.confrelid = ANY(CAST(:tables AS regclass[]))
                OR (c.conrelid = CAST(:t AS regclass) AND :n = ANY(c.conkey)))
            ORDER BY 1, 2""", tables=tables, t=table, n=col.attnum):
        out.append(Statement("foreign_keys",
                             f"ALTER TABLE {fk.tbl} ADD CONSTRAINT {fk.conname} {fk.definition}"))

    for owner, trigger in TRANSITION_TRIGGERS:
        out += _triggers(conn, owner, trigger)
    return _dedupe(out)


def _sequences(conn: Connection, table: str) -> list[Statement]:
    out = []
    for seq in _rows(conn, """
            SELECT s.seqrelid::regclass::text AS name, format_type(s.seqtypid, NULL) AS type,
                   s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle, a.attname
            FROM pg_depend d JOIN pg_sequence s ON s.seqrelid = d.objid
            JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
            WHERE d.refobjid = CAST(:t AS regclass) AND d.deptype = 'a'
              AND d.classid = 'pg_class'::regclass""",
                         t=table):
        last_value, is_called = conn.execute(sa.text(f"SELECT last_value, is_called FROM {seq.name}")).one()
        out.append(Statement("sequences", (
            f"CREATE SEQUENCE {seq.name} AS {seq.type} START WITH {seq.seqstart} INCREMENT BY "
            f"{seq.seqincrement} MINVALUE {seq.seqmin} MAXVALUE {seq.seqmax} CACHE {seq.seqcache}"
            f"{' CYCLE' if seq.seqcycle else ''}")))
        out.append(Statement("owned_by", f"ALTER SEQUENCE {seq.name} OWNED BY {table}.{seq.attname}"))
        called = str(is_called).lower()
        out.append(Statement("setval", f"SELECT setval('{seq.name}', {last_value}, {called})"))
    return out


def _create_table(conn: Connection, table: str) -> str:
    columns = []
    for col in _rows(conn, f"""
            SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid) AS default_expr, {NOT_NULL_NAME}
            FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum""", t=table):
        definition = f"    {col.attname} {col.type}"
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
            SELECT t.tgname, pg_get_triggerdef(t.oid) AS definition, pg_get_functiondef(t.tgfoid) AS fn
            FROM pg_trigger t WHERE t.tgrelid = CAST(:t AS regclass) AND NOT t.tgisinternal
              AND (CAST(:only AS text) IS NULL OR t.tgname = :only)
              AND t.tgname NOT LIKE 'toolkit%' ORDER BY t.tgname""", t=table, only=only):
        out.append(Statement("functions", trig.fn.strip()))
        out.append(Statement("triggers", trig.definition))
    return out


def _dedupe(statements: list[Statement]) -> list[Statement]:
    seen, out = set(), []
    for s in statements:
        if (s.phase, s.sql) not in seen:
            seen.add((s.phase, s.sql))
            out.append(s)
    return sorted(out, key=lambda s: PHASES.index(s.phase))
