"""The toolkit's own tables: run history, checkpoints, milestone states, milestone 1's ledger.

This is the first revision of the ``toolkit`` branch; milestone schema changes to GitLab's
tables live on the separate ``gitlab`` branch, so rolling one back never drops a ledger.

Revision ID: 0001_own_tables
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001_own_tables"
down_revision = None
branch_labels = ("toolkit",)
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("milestone", sa.Text),
        sa.Column("options", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("database_user", sa.Text, nullable=False),
        sa.Column("os_user", sa.Text),
        sa.Column("host", sa.Text),
        sa.Column("toolkit_version", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("outcome", sa.Text, nullable=False, server_default=sa.text("'running'")),
        sa.Column("rows_by_step", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("error", sa.Text),
        schema=SCHEMA,
    )
    op.create_table(
        "checkpoints",
        sa.Column("milestone", sa.Text, primary_key=True),
        sa.Column("step", sa.Text, primary_key=True),
        sa.Column("last_key", sa.BigInteger),
        sa.Column("upper_key", sa.BigInteger),
        sa.Column("rows_done", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("batches_done", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("run_id", sa.BigInteger),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        schema=SCHEMA,
    )
    op.create_table(
        "milestones",
        sa.Column("milestone", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True)),
        sa.Column("verified_at", sa.DateTime(timezone=True)),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True)),
        sa.Column("last_run_id", sa.BigInteger),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        schema=SCHEMA,
    )
    op.create_table(
        "m1_converted_packages",
        sa.Column("package_id", sa.BigInteger, primary_key=True),
        sa.Column("previous_package_type", sa.SmallInteger, nullable=False),
        sa.Column("run_id", sa.BigInteger),
        sa.Column("converted_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("m1_converted_packages", schema=SCHEMA)
    op.drop_table("milestones", schema=SCHEMA)
    op.drop_table("checkpoints", schema=SCHEMA)
    op.drop_table("runs", schema=SCHEMA)
