"""The rows a check or an anomaly names: all of them counted, the first few kept.

A check that fails on a production database can match a million rows (every candidate
without a model, before milestone 3). Loading them all to print twelve would make the
toolkit's memory grow with the data and a plan take as long as a migration, so the query
is streamed through a server-side cursor: every row is counted, the first
:data:`LISTED_ROWS` are kept, the rest are dropped as they pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

LISTED_ROWS = 1000
# Per statement, never on the connection: Connection.execution_options() changes the
# connection itself, and every later statement (SET LOCAL too) would become a cursor.
STREAMED = {"stream_results": True, "yield_per": 5000}


def read_to_the_end(conn: Connection) -> None:
    """Plan this transaction's cursors for all their rows, not the first tenth.

    A server-side cursor is planned with ``cursor_tuple_fraction`` (0.1): the planner
    picks the plan that yields the first rows soonest. For ``ORDER BY c.id`` over a join
    of 1M candidates that is an index walk with a lookup per row, 1.9 s at x25, where the
    hash join and a sort take 0.25 s. Every cursor the toolkit opens is read to its end
    (every matching row is counted), so the whole result is what to plan for.
    """
    conn.execute(sa.text("SELECT set_config('cursor_tuple_fraction', '1', true)"))


class Listing(list[dict[str, Any]]):
    """The first rows of a query (a list of dicts), and ``total``: how many rows matched."""

    total: int

    def __init__(self, rows: list[dict[str, Any]], total: int, limit: int | None = None):
        super().__init__(rows)
        self.total = total
        self.limit = LISTED_ROWS if limit is None else limit

    def add(self, row: dict[str, Any]) -> None:
        """Count one more matching row; keep it if there is room."""
        self.total += 1
        if len(self) < self.limit:
            self.append(row)


def listed(conn: Connection, sql: str, *, keep: Callable[[dict[str, Any]], bool] | None = None,
           limit: int | None = None, **params: Any) -> Listing:
    """Stream ``sql``; count the rows (those ``keep`` accepts), keep the first ``limit``."""
    listing = Listing([], 0, limit)
    read_to_the_end(conn)
    result = conn.execute(sa.text(sql), params, execution_options=STREAMED)
    for row in result:
        mapping = dict(row._mapping)
        if keep is None or keep(mapping):
            listing.add(mapping)
    return listing


def count_of(rows: list[dict[str, Any]]) -> int:
    """How many rows matched, for a :class:`Listing` or a plain list."""
    return getattr(rows, "total", len(rows))
