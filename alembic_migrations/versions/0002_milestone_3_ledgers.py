"""Milestone 3's ledgers: models it created, metadata it copied, clashes it found.

Revision ID: 0002_m3_ledgers
Revises: 0001_own_tables
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_m3_ledgers"
down_revision = "0001_own_tables"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "m3_created_models",
        sa.Column("model_id", sa.BigInteger, primary_key=True),
        sa.Column("experiment_id", sa.BigInteger, nullable=False),
        sa.Column("project_id", sa.BigInteger, nullable=False),
        sa.Column("run_id", sa.BigInteger),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        schema=SCHEMA,
    )
    op.create_table(
        "m3_copied_metadata",
        sa.Column("model_metadata_id", sa.BigInteger, primary_key=True),
        sa.Column("model_id", sa.BigInteger, nullable=False),
        sa.Column("run_id", sa.BigInteger),
        schema=SCHEMA,
    )
    op.create_table(
        "m3_metadata_clashes",
        sa.Column("experiment_id", sa.BigInteger, primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("model_id", sa.BigInteger, nullable=False),
        sa.Column("experiment_value", sa.Text, nullable=False),
        sa.Column("model_value", sa.Text, nullable=False),
        sa.Column("run_id", sa.BigInteger),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("m3_metadata_clashes", schema=SCHEMA)
    op.drop_table("m3_copied_metadata", schema=SCHEMA)
    op.drop_table("m3_created_models", schema=SCHEMA)
