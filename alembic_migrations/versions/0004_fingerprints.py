"""Fingerprints taken before each milestone, which verify compares against.

Revision ID: 0004_fingerprints
Revises: 0003_m4_archive
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004_fingerprints"
down_revision = "0003_m4_archive"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "fingerprints",
        sa.Column("milestone", sa.Text, primary_key=True),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.Column("run_id", sa.BigInteger),
        sa.Column("body", JSONB, nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("fingerprints", schema=SCHEMA)
