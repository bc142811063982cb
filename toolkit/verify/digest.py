"""Row counts and content hashes computed inside PostgreSQL.

A digest is the row count and the exact sum of a 64-bit hash of every row's text. The
sum is order-independent, so the same rows give the same digest however they are stored
or joined; it streams (the server never builds the rows in memory, nor does the toolkit:
a 10M-row table is one sequential scan); and it is one aggregate PostgreSQL runs in
parallel workers, each summing its share of the table.

Fingerprints of format 1 also took the XOR of the hashes. A second aggregate made
PostgreSQL compute every row's text and hash twice (the subquery is flattened into both
aggregates): it doubled the cost of a digest for a check the exact sum already makes.
A fingerprint records its format, and one of format 1 (a baseline stored by an earlier
toolkit) is compared with digests computed its way (:data:`METHODS`).
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


Memo = dict[tuple[int, str, tuple[tuple[str, Any], ...]], tuple[int, str]]

# The aggregates of each fingerprint format over ``h``, each row's hash.
METHODS = {
    1: "count(*), COALESCE(sum(h::numeric), 0), COALESCE(bit_xor(h), 0)",
    2: "count(*), COALESCE(sum(h), 0)",
}
METHOD = 2


def query_digest(conn: Connection, row_sql: str, params: dict[str, Any] | None = None,
                 memo: Memo | None = None, method: int = METHOD) -> tuple[int, str]:
    """Digest of a query whose single column ``r`` is each row's text.

    ``memo``: digests already computed in the same snapshot (``verify`` of all four
    milestones compares with four fingerprints that mostly share their watermarks)."""
    key = (method, row_sql, tuple(sorted((params or {}).items())))
    if memo is not None and key in memo:
        return memo[key]
    rows, *sums = conn.execute(sa.text(
        f"SELECT {METHODS[method]} FROM (SELECT hashtextextended(q.r, 0) AS h FROM ({row_sql}) AS q) AS s"
    ), params or {}).one()
    result = rows, hashlib.sha256(":".join(map(str, (rows, *sums))).encode()).hexdigest()[:32]
    if memo is not None:
        memo[key] = result
    return result


def bucketed_digest(conn: Connection, row_sql: str, params: dict[str, Any], size: int,
                    method: int = METHOD, memo: Memo | None = None) -> tuple[int, str, dict[str, str]]:
    """:func:`query_digest` of a query whose rows also carry a key ``k`` (a run's or a
    model's id), with the digest of each bucket of ``size`` keys beside the whole one. The
    whole digest is the same as :func:`query_digest`'s (the sums add up), so a fingerprint
    with buckets compares with one without; the buckets only say *where* two differ: with
    one key a bucket (small databases) they name the run or model."""
    if method != METHOD:  # an earlier format: no buckets
        rows, digest = query_digest(conn, row_sql, params, memo, method)
        return rows, digest, {}
    key = (method, f"{row_sql} /* buckets of {size} */", tuple(sorted(params.items())))
    if memo is not None and key in memo:
        return memo[key]  # type: ignore[return-value]
    found = conn.execute(sa.text(
        # integer division, not div(): div() takes numeric, and casting every key of a 1M-row
        # part to numeric cost a tenth of the digest; the buckets are the same (keys are ids)
        f"SELECT s.b, count(*), COALESCE(sum(s.h), 0) FROM (SELECT q.k / CAST(:bucket_size AS bigint) AS b, "
        f"hashtextextended(q.r, 0) AS h FROM ({row_sql}) AS q) AS s GROUP BY s.b"),
        {**params, "bucket_size": size}).all()
    rows, total = sum(n for _, n, _ in found), sum(int(h) for _, _, h in found)
    whole = hashlib.sha256(f"{rows}:{total}".encode()).hexdigest()[:32]
    buckets = {str(b): hashlib.sha256(f"{n}:{h}".encode()).hexdigest()[:12] for b, n, h in found}
    if memo is not None:
        memo[key] = (rows, whole, buckets)  # type: ignore[assignment]
    return rows, whole, buckets


def row_text(conn: Connection, table: str, alias: str = "t") -> str:
    """``ROW(columns)::text`` with the columns in name order, not table order: a column
    dropped and added back (milestone 4's rollback) comes back last, and the same data
    must still give the same digest."""
    columns = [r[0] for r in conn.execute(sa.text(
        "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attname"), {"t": table})]
    return "ROW(" + ", ".join(f'{alias}."{c}"' for c in columns) + ")::text"


def table_digest(conn: Connection, table: str, where: str | None = None,
                 params: dict[str, Any] | None = None, memo: Memo | None = None,
                 method: int = METHOD) -> TableDigest:
    condition = f" WHERE {where}" if where else ""
    rows, digest = query_digest(conn, f"SELECT {row_text(conn, table)} AS r FROM {table} AS t{condition}",
                                params, memo, method)
    return TableDigest(table, rows, digest)


def digests(conn: Connection, tables: tuple[str, ...]) -> dict[str, TableDigest]:
    return {table: table_digest(conn, table) for table in tables}
