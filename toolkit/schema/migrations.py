"""Running the Alembic revisions in ``alembic_migrations/`` from inside the toolkit."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

import alembic_migrations
from toolkit.schema.own import SCHEMA, VERSION_TABLE

OWN_TABLES_HEAD = "0001_own_tables"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(alembic_migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(alembic_config(connection), revision)


def downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(alembic_config(connection), revision)


def current_revision(connection: Connection) -> str | None:
    """The applied revision, read without creating anything (safe in a dry run)."""
    exists = connection.execute(
        sa.text("SELECT to_regclass(:name) IS NOT NULL"), {"name": f"{SCHEMA}.{VERSION_TABLE}"}
    ).scalar_one()
    if not exists:
        return None
    return connection.execute(
        sa.text(f"SELECT version_num FROM {SCHEMA}.{VERSION_TABLE}")
    ).scalar_one_or_none()


def ensure_own_tables(connection: Connection) -> None:
    """Create the toolkit's schema and tables if this database has never seen the toolkit."""
    if current_revision(connection) is None:
        upgrade(connection, OWN_TABLES_HEAD)
