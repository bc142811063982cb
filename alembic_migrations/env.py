"""Alembic environment: the toolkit's version table lives in its own schema.

The toolkit runs Alembic programmatically and hands it a connection through
``config.attributes["connection"]``; ``alembic`` on the command line works too, with
``TOOLKIT_DATABASE_URL`` set. Offline mode (``--sql``) renders the same revisions.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import text

from toolkit.schema.own import SCHEMA, VERSION_TABLE, metadata

config = context.config


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        version_table_schema=SCHEMA,
        transaction_per_migration=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=os.environ.get("TOOLKIT_DATABASE_URL", "postgresql://"), literal_binds=True,
               dialect_name="postgresql")
    with context.begin_transaction():
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        from toolkit.db import create_engine, parse_url

        engine = create_engine(parse_url(os.environ["TOOLKIT_DATABASE_URL"]))
        with engine.connect() as conn:
            _run(conn)
        return
    _run(connection)


def _run(connection) -> None:
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    connection.commit()
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
