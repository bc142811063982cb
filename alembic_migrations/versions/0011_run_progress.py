"""A running run's progress, readable from any host: ``toolkit status`` of a running run.

``toolkit.run_progress`` has one row per run, written by the run itself: its phase, the pass
under way (keys done of the keys it had to do, rows changed, batches), its last batch
(when, how long, how many keys and rows) and its waits on the database's health. The batch
row is updated in the batch's own transaction, in the statement that already writes the
run's row count, so it costs no extra round trip. ``runs.wal_bytes_by_step`` is the WAL the
run's batches wrote, by pass (LSN deltas read in each batch's transaction), kept with the
run's history like ``rows_by_step``.

Revision ID: 0011_run_progress
Revises: 0010_run_control
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0011_run_progress"
down_revision = "0010_run_control"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.add_column("runs", sa.Column("wal_bytes_by_step", JSONB, nullable=False,
                                    server_default=sa.text("'{}'::jsonb")), schema=SCHEMA)
    op.create_table(
        "run_progress",
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey(f"{SCHEMA}.runs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("phase", sa.Text),  # fingerprint, apply, verify, checks
        sa.Column("phase_started_at", sa.DateTime(timezone=True)),
        sa.Column("pass_name", sa.Text),
        sa.Column("pass_started_at", sa.DateTime(timezone=True)),  # when this run took it up
        sa.Column("pass_key_from", sa.BigInteger),  # 0, or the checkpoint it resumed after
        sa.Column("pass_keys_total", sa.BigInteger),  # keys left in the pass when this run took it up
        sa.Column("pass_keys_done", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("pass_rows", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("pass_batches", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("last_batch_at", sa.DateTime(timezone=True)),
        sa.Column("last_batch_ms", sa.Float),  # its transaction up to its checkpoint
        sa.Column("last_batch_keys", sa.BigInteger),
        sa.Column("last_batch_rows", sa.BigInteger),
        sa.Column("wal_lsn", sa.BigInteger),  # WAL insert position at the last checkpoint (bytes)
        sa.Column("throttled_seconds", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("throttled_since", sa.DateTime(timezone=True)),  # NULL: not waiting now
        sa.Column("throttled_by", JSONB),  # the signals over their limits in the wait under way
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("clock_timestamp()")),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("run_progress", schema=SCHEMA)
    op.drop_column("runs", "wal_bytes_by_step", schema=SCHEMA)
