"""Requests to steer a running run from any host: ``toolkit control pause|resume|abort|set``.

The running run reads the requests it has not taken yet at every batch boundary and during
every wait (one indexed read of the unapplied rows newer than the last it saw), and marks
each one taken (``applied_at``, ``applied_by``): the table is the control history, who
asked (database user, OS user, host), when, why, and which run acted on it.

Revision ID: 0010_run_control
Revises: 0009_mlflow_writes
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_run_control"
down_revision = "0009_mlflow_writes"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "run_controls",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("database", sa.Text, nullable=False, server_default=sa.text("current_database()")),
        sa.Column("action", sa.Text, nullable=False),  # pause, resume, abort, set
        sa.Column("key", sa.Text),  # set: the option, e.g. target-batch-ms
        sa.Column("value", sa.Text),  # set: its new value, as validated by the CLI
        sa.Column("reason", sa.Text),
        sa.Column("db_user", sa.Text, nullable=False, server_default=sa.text("current_user")),
        sa.Column("os_user", sa.Text),
        sa.Column("host", sa.Text),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("clock_timestamp()")),
        sa.Column("applied_at", sa.DateTime(timezone=True)),
        sa.Column("applied_by", sa.BigInteger),  # the run (toolkit.runs.id) that took it; NULL: none
        sa.Column("note", sa.Text),  # e.g. "no run was going"
        schema=SCHEMA,
    )
    # What a run reads at each batch boundary: the few rows not yet taken.
    op.create_index("run_controls_pending", "run_controls", ["id"], schema=SCHEMA,
                    postgresql_where=sa.text("applied_at IS NULL"))


def downgrade() -> None:
    op.drop_table("run_controls", schema=SCHEMA)
