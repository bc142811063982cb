"""Row counts and content hashes computed inside PostgreSQL.

A digest is the row count, the sum and the XOR of a 64-bit hash of every row's text.
Both aggregates are order-independent, so the same rows give the same digest however
they are stored or joined, and they stream: the server never builds the rows in memory
and neither does the toolkit (a 10M-row table is one sequential scan).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection


@dataclass(frozen=True)
class TableDigest:
    table: str
    rows: int
    digest: str


Memo = dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[int, str]]


def query_digest(conn: Connection, row_sql: str, params: dict[str, Any] | None = None,
                 memo: Memo | None = None) -> tuple[int, str]:
    """Digest of a query whose single column ``r`` is each row's text.

    ``memo``: digests already computed in the same snapshot (``verify`` of all four
    milestones compares with four fingerprints that mostly share their watermarks)."""
    key = (row_sql, tuple(sorted((params or {}).items())))
    if memo is not None and key in memo:
        return memo[key]
    rows, total, xor = conn.execute(sa.text(
        "SELECT count(*), COALESCE(sum(h::numeric), 0), COALESCE(bit_xor(h), 0) "
        f"FROM (SELECT hashtextextended(q.r, 0) AS h FROM ({row_sql}) AS q) AS s"
    ), params or {}).one()
    result = rows, hashlib.sha256(f"{rows}:{total}:{xor}".encode()).hexdigest()[:32]
    if memo is not None:
        memo[key] = result
    return result


def row_text(conn: Connection, table: str, alias: str = "t") -> str:
    """``ROW(columns)::text`` with the columns in name order, not table order: a column
    dropped and added back (milestone 4's rollback) comes back last, and the same data
    must still give the same digest."""
    columns = [r[0] for r in conn.execute(sa.text(
        "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attname"), {"t": table})]
    return "ROW(" + ", ".join(f'{alias}."{c}"' for c in columns) + ")::text"


def table_digest(conn: Connection, table: str, where: str | None = None,
                 params: dict[str, Any] | None = None, memo: Memo | None = None) -> TableDigest:
    condition = f" WHERE {where}" if where else ""
    rows, digest = query_digest(conn, f"SELECT {row_text(conn, table)} AS r FROM {table} AS t{condition}",
                                params, memo)
    return TableDigest(table, rows, digest)


def digests(conn: Connection, tables: tuple[str, ...]) -> dict[str, TableDigest]:
    return {table: table_digest(conn, table) for table in tables}
