"""Milestone 4's recorded DDL names the table and the object of each statement.

The rollback composes ``DROP CONSTRAINT IF EXISTS``, ``VALIDATE CONSTRAINT`` and ``DROP
TRIGGER IF EXISTS`` from these, as they are written in SQL (quoted where needed), instead
of reading them back out of the statement by word position. Rows recorded by an earlier
toolkit (a milestone 4 applied before this revision) get them from their statements once,
here.

Revision ID: 0006_archived_ddl_names
Revises: 0005_runner_lease
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_archived_ddl_names"
down_revision = "0005_runner_lease"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.add_column("m4_archived_ddl", sa.Column("table_name", sa.Text), schema=SCHEMA)
    op.add_column("m4_archived_ddl", sa.Column("object_name", sa.Text), schema=SCHEMA)
    # Earlier rows: "ALTER TABLE t ADD CONSTRAINT n ..." and "CREATE TRIGGER n ... ON t ...";
    # the other phases are replayed as they are and need no names.
    op.execute(f"""
        UPDATE {SCHEMA}.m4_archived_ddl
        SET table_name = split_part(statement, ' ', 3), object_name = split_part(statement, ' ', 6)
        WHERE phase = 'foreign_keys' AND table_name IS NULL""")
    op.execute(f"""
        UPDATE {SCHEMA}.m4_archived_ddl
        SET table_name = split_part(split_part(statement, ' ON ', 2), ' ', 1),
            object_name = split_part(statement, ' ', 3)
        WHERE phase = 'triggers' AND table_name IS NULL""")


def downgrade() -> None:
    op.drop_column("m4_archived_ddl", "object_name", schema=SCHEMA)
    op.drop_column("m4_archived_ddl", "table_name", schema=SCHEMA)
