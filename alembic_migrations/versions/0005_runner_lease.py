"""The runner lease: one row whose fencing token every writing transaction checks.

The advisory lock says who may start; the lease says who may still commit. Each run that
takes the advisory lock bumps ``token`` and records the backend that holds the lock (pid
and start time); every one of its commits first reads the row FOR SHARE and refuses
unless the token is still its own and that backend is still there. ``runs.last_batch_at``
is when a run last committed, so history can tell when a run that could not record its
end stopped.

Revision ID: 0005_runner_lease
Revises: 0004_fingerprints
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_runner_lease"
down_revision = "0004_fingerprints"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "runner_lease",
        sa.Column("id", sa.SmallInteger, primary_key=True),
        sa.Column("token", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("run_id", sa.BigInteger),
        sa.Column("holder_pid", sa.Integer),
        sa.Column("holder_started", sa.DateTime(timezone=True)),  # its backend_start: pids are reused
        sa.Column("holder", sa.Text),
        sa.Column("acquired_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("id = 1", name="runner_lease_one_row"),
        schema=SCHEMA,
    )
    op.execute(f"INSERT INTO {SCHEMA}.runner_lease (id, token) VALUES (1, 0)")
    op.add_column("runs", sa.Column("last_batch_at", sa.DateTime(timezone=True)), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("runs", "last_batch_at", schema=SCHEMA)
    op.drop_table("runner_lease", schema=SCHEMA)
