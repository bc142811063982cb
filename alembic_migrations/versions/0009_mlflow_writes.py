"""The rows MLflow clients wrote through ``toolkit mlflow serve --allow-writes``.

Each write records the rows it inserted, updated or deleted in its own transaction, so
``verify`` can tell the application's writes from the migration's: a run a training job
finished during milestone 2 is the application's change, not a lost row.

Revision ID: 0009_mlflow_writes
Revises: 0008_mlflow_experiment_ids
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_mlflow_writes"
down_revision = "0008_mlflow_experiment_ids"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "mlflow_writes",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("clock_timestamp()")),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("table_name", sa.Text, nullable=False),
        sa.Column("row_id", sa.BigInteger, nullable=False),
        sa.Column("action", sa.Text, nullable=False),  # insert, update, delete
        sa.Column("candidate_id", sa.BigInteger),  # the run whose view it changes, if any
        sa.Column("model_id", sa.BigInteger),  # the model whose view it changes, if any
        schema=SCHEMA,
    )
    op.create_index("mlflow_writes_table_row", "mlflow_writes", ["table_name", "row_id"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_table("mlflow_writes", schema=SCHEMA)
