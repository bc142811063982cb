"""What a database holds: exact row counts of GitLab's ML tables, missing tables named."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.schema.gitlab import ML_TABLE_NAMES


def existing_tables(conn: Connection, names: tuple[str, ...] = ML_TABLE_NAMES) -> set[str]:
    rows = conn.execute(
        sa.text("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
                "AND c.relname = ANY(:names)"),
        {"names": list(names)},
    )
    return {r[0] for r in rows}


def table_counts(conn: Connection) -> dict[str, int | None]:
    """Exact counts; ``None`` for a table that does not exist."""
    present = existing_tables(conn)
    return {
        name: conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one()
        if name in present else None
        for name in ML_TABLE_NAMES
    }
