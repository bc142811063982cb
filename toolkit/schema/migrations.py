"""Running the Alembic revisions in ``alembic_migrations/`` from inside the toolkit."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

import alembic_migrations
from toolkit.schema.own import SCHEMA, VERSION_TABLE

OWN_TABLES_HEAD = "toolkit@head"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    # __path__ rather than __file__: works for a regular and a namespace-style (editable) install.
    config.set_main_option("script_location", str(Path(next(iter(alembic_migrations.__path__)))))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(alembic_config(connection), revision)


def downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(alembic_config(connection), revision)


def own_schema_exists(connection: Connection) -> bool:
    return connection.execute(
        sa.text("SELECT to_regclass(:name) IS NOT NULL"), {"name": f"{SCHEMA}.{VERSION_TABLE}"}
    ).scalar_one()


def applied_revisions(connection: Connection) -> set[str]:
    """The heads recorded in the version table, read without creating anything (dry-run safe)."""
    if not own_schema_exists(connection):
        return set()
    return {r[0] for r in connection.execute(sa.text(f"SELECT version_num FROM {SCHEMA}.{VERSION_TABLE}"))}


def own_tables_current(connection: Connection) -> bool:
    script = ScriptDirectory.from_config(alembic_config())
    return script.get_revision(OWN_TABLES_HEAD).revision in applied_revisions(connection)


def ensure_own_tables(connection: Connection) -> None:
    """Bring the toolkit's own schema up to date; a no-op when it already is."""
    if not own_tables_current(connection):
        upgrade(connection, OWN_TABLES_HEAD)
        connection.commit()
