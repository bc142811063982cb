"""Milestone 4's archive bookkeeping: the DDL of what it drops, and candidates' experiment_id.

The archived rows of ml_experiments and ml_experiment_metadata live in tables the
archive step creates with LIKE, so they have exactly the columns of this database's
tables (a newer GitLab may have more than the toolkit knows).

Revision ID: 0003_m4_archive
Revises: 0002_m3_ledgers
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_m4_archive"
down_revision = "0002_m3_ledgers"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "m4_archived_ddl",
        sa.Column("ordinal", sa.Integer, primary_key=True),
        sa.Column("phase", sa.Text, nullable=False),
        sa.Column("statement", sa.Text, nullable=False),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        schema=SCHEMA,
    )
    op.create_table(
        "m4_archive_candidate_experiments",
        sa.Column("candidate_id", sa.BigInteger, primary_key=True),
        sa.Column("experiment_id", sa.BigInteger, nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("m4_archive_candidate_experiments", schema=SCHEMA)
    op.drop_table("m4_archived_ddl", schema=SCHEMA)
