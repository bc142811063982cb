"""The MLflow experiment id of each model that stands for an experiment, kept for good.

After milestone 4 the experiments are gone, and GitLab's MLflow API still answers
``experiment_id`` (the experiment's per-project iid) for them. Milestone 4 writes one row
per experiment here in the transaction that drops ``ml_experiments``; ``toolkit archive
drop`` leaves this table (it is not the archive: it is what a blueprint-complete GitLab
needs to keep answering old experiment ids), and milestone 4's rollback empties it once the
experiments are rebuilt. Columns are those of ``ml_experiments`` that the MLflow view reads.

Revision ID: 0008_mlflow_experiment_ids
Revises: 0007_run_writes
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_mlflow_experiment_ids"
down_revision = "0007_run_writes"
branch_labels = None
depends_on = None

SCHEMA = "toolkit"


def upgrade() -> None:
    op.create_table(
        "mlflow_experiment_ids",
        sa.Column("id", sa.BigInteger, primary_key=True),  # the experiment's row id, as it was
        sa.Column("project_id", sa.BigInteger, nullable=False),
        sa.Column("iid", sa.BigInteger, nullable=False),  # the MLflow experiment_id
        sa.Column("model_id", sa.BigInteger, nullable=False),
        sa.Column("name", sa.Text, nullable=False),  # the experiment's name, as it was
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),  # search orders by it
        sa.Column("deleted_on", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("project_id", "iid"),
        schema=SCHEMA,
    )
    op.create_index("mlflow_experiment_ids_model_id", "mlflow_experiment_ids", ["model_id"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_table("mlflow_experiment_ids", schema=SCHEMA)
