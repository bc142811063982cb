"""The toolkit's own tables, in a PostgreSQL schema of its own.

Nothing here touches GitLab's tables: run history, checkpoints (and, in later
milestones, undo ledgers and the archive) live in ``toolkit``, created by the Alembic
revisions in ``alembic_migrations/`` whose version table is ``toolkit.alembic_version``.
A dry run never creates this schema; it reads it only when it already exists.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

SCHEMA = "toolkit"
VERSION_TABLE = "alembic_version"

metadata = MetaData(schema=SCHEMA)

runs = Table(
    "runs", metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("command", Text, nullable=False),
    Column("milestone", Text),
    Column("options", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("database_user", Text, nullable=False),
    Column("os_user", Text),
    Column("host", Text),
    Column("toolkit_version", Text, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("finished_at", DateTime(timezone=True)),
    Column("outcome", Text, nullable=False, server_default=text("'running'")),
    Column("rows_by_step", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("error", Text),
    Column("last_batch_at", DateTime(timezone=True)),  # its last commit: when it really stopped
    # pg_stat_get_xact_* counters were on for all of it (engine/writes.py)
    Column("writes_tracked", Boolean, nullable=False, server_default=text("false")),
)

# Rows each run's own transactions wrote, per GitLab table (engine/writes.py).
run_writes = Table(
    "run_writes", metadata,
    Column("run_id", BigInteger, ForeignKey(f"{SCHEMA}.runs.id", ondelete="CASCADE"), primary_key=True),
    Column("table_name", Text, primary_key=True),
    Column("inserted", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("deleted", BigInteger, nullable=False),
)

# One row: who may commit now (engine/lease.py).
runner_lease = Table(
    "runner_lease", metadata,
    Column("id", SmallInteger, primary_key=True),
    Column("token", BigInteger, nullable=False, server_default=text("0")),
    Column("run_id", BigInteger),
    Column("holder_pid", Integer),
    Column("holder_started", DateTime(timezone=True)),
    Column("holder", Text),
    Column("acquired_at", DateTime(timezone=True)),
    CheckConstraint("id = 1", name="runner_lease_one_row"),
)

checkpoints = Table(
    "checkpoints", metadata,
    Column("milestone", Text, primary_key=True),
    Column("step", Text, primary_key=True),
    Column("last_key", BigInteger),
    # The pass's last key, fixed when it starts: rows inserted later are not chased (the
    # application could insert faster than batches go); the next run or a trigger covers them.
    Column("upper_key", BigInteger),
    Column("rows_done", BigInteger, nullable=False, server_default=text("0")),
    Column("batches_done", BigInteger, nullable=False, server_default=text("0")),
    Column("run_id", BigInteger),
    Column("completed_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

milestones = Table(
    "milestones", metadata,
    Column("milestone", Text, primary_key=True),
    Column("state", Text, nullable=False),  # in_progress, applied, verified, rolled_back
    Column("applied_at", DateTime(timezone=True)),
    Column("verified_at", DateTime(timezone=True)),
    Column("rolled_back_at", DateTime(timezone=True)),
    Column("last_run_id", BigInteger),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

# Milestone 1's undo ledger: exactly the packages it converted, and what they were.
m1_converted_packages = Table(
    "m1_converted_packages", metadata,
    Column("package_id", BigInteger, primary_key=True),
    Column("previous_package_type", SmallInteger, nullable=False),
    Column("run_id", BigInteger),
    Column("converted_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)
