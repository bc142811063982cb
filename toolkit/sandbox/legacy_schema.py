"""Create GitLab's ML tables in a sandbox or test database, in two phases.

On a real GitLab database these tables are a given; only the sandbox creates them.
Creation is split so that bulk loading is fast: :func:`create_tables` makes bare tables
(sequences, columns, CHECKs, primary keys); :func:`finish_schema` then adds indexes,
foreign keys, the NOT VALID CHECK, sequence ownership and the ``project_id`` triggers.
Building indexes once over loaded data is several times faster than maintaining them
row by row, and the triggers would otherwise run a lookup for every loaded row.
"""

from __future__ import annotations

from typing import cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import AddConstraint, CreateIndex, CreateSequence, CreateTable

from toolkit.schema import gitlab
from toolkit.schema.triggers import PROJECT_ID_TRIGGERS

ALL_TABLES = gitlab.STUB_TABLE_NAMES + gitlab.ML_TABLE_NAMES


def _tables() -> list[sa.Table]:
    return [gitlab.metadata.tables[name] for name in ALL_TABLES]


def create_tables(conn: Connection) -> None:
    conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    for table in _tables():
        if "id" in table.c:  # project_authorizations has none
            conn.execute(CreateSequence(cast(sa.Sequence, table.c.id.default), if_not_exists=True))
    for table in _tables():
        conn.execute(CreateTable(table, include_foreign_key_constraints=[]))


def finish_schema(conn: Connection) -> None:
    for table in _tables():
        if "id" in table.c:
            conn.execute(sa.text(f"ALTER SEQUENCE {table.name}_id_seq OWNED BY {table.name}.id"))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            conn.execute(CreateIndex(index))
        for fk in sorted(table.foreign_key_constraints, key=lambda c: str(c.name)):
            conn.execute(AddConstraint(fk))
    name, checked, expression = gitlab.PACKAGES_STATUS_MESSAGE_CHECK
    conn.execute(sa.text(f"ALTER TABLE {checked} ADD CONSTRAINT {name} CHECK ({expression}) NOT VALID"))
    for trigger in PROJECT_ID_TRIGGERS:
        conn.execute(sa.text(trigger.create_function_sql()))
        conn.execute(sa.text(trigger.create_trigger_sql()))


def create_legacy_schema(conn: Connection) -> None:
    """Both phases at once: an empty GitLab-shaped database."""
    create_tables(conn)
    finish_schema(conn)


def drop_legacy_schema(conn: Connection) -> None:
    for table in reversed(_tables()):
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {table.name} CASCADE"))
    for trigger in PROJECT_ID_TRIGGERS:
        conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {trigger.name}() CASCADE"))
