"""What each run's own transactions wrote: rows inserted, updated and deleted per GitLab table.

Filled inside every transaction a run commits, from ``pg_stat_get_xact_tuples_*``, just
before COMMIT (engine/writes.py). ``runs.writes_tracked`` says the counters were on
(``track_counts``) for the whole run; verify proves a table untouched only from runs that
were tracked.

Revision ID: 0007_run_writes
Revises: 0006_archived_ddl_names
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_run_writes"
down_revision = "0006_archived_ddl_names"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "run_writes",
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey(f"{SCHEMA}.runs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("table_name", sa.Text, primary_key=True),
        sa.Column("inserted", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.BigInteger, nullable=False),
        schema=SCHEMA,
    )
    op.add_column("runs", sa.Column("writes_tracked", sa.Boolean, nullable=False,
                                    server_default=sa.false()), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("runs", "writes_tracked", schema=SCHEMA)
    op.drop_table("run_writes", schema=SCHEMA)
