"""Row counts and content hashes of whole tables, computed inside PostgreSQL.

A digest is the row count, the sum and the XOR of a 64-bit hash of every row's text
(its columns taken in name order).
Both aggregates are order-independent, so the same rows give the same digest however
they are stored, and they stream: the server never builds the table in memory and
neither does the toolkit (a 10M-row table is one sequential scan).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection


@dataclass(frozen=True)
class TableDigest:
    table: str
    rows: int
    digest: str


def table_digest(conn: Connection, table: str, where: str | None = None) -> TableDigest:
    condition = f" WHERE {where}" if where else ""
    # Columns in name order, not table order: a column dropped and added back (milestone 4's
    # rollback) comes back last, and the same data must still give the same digest.
    columns = [r[0] for r in conn.execute(sa.text(
        "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attname"), {"t": table})]
    row = "ROW(" + ", ".join(f't."{c}"' for c in columns) + ")::text"
    rows, total, xor = conn.execute(sa.text(
        "SELECT count(*), COALESCE(sum(h::numeric), 0), COALESCE(bit_xor(h), 0) "
        f"FROM (SELECT hashtextextended({row}, 0) AS h FROM {table} AS t{condition}) AS s"
    )).one()
    digest = hashlib.sha256(f"{rows}:{total}:{xor}".encode()).hexdigest()[:32]
    return TableDigest(table, rows, digest)


def digests(conn: Connection, tables: tuple[str, ...]) -> dict[str, TableDigest]:
    return {table: table_digest(conn, table) for table in tables}
