"""The MLflow view at each stage of the blueprint: where experiments, their tags and a
run's experiment are read, as GitLab's MLflow endpoints will have to read them.

- before milestone 3 (:data:`FROM_EXPERIMENTS`): from ``ml_experiments`` (runs through
  ``experiment_id``);
- once models have ``display_name`` (:data:`FROM_MODELS`): experiments through their
  model (the name is the display name of a model milestone 3 created, or the default
  experiment's own name for a model that already had one), and runs through
  ``ml_candidates.model_id``;
- after milestone 4 (:data:`FROM_MODELS_AND_ARCHIVE`): the same, with the ``iid``
  mapping and experiment tags read from the archive (``toolkit.m4_archive_*``);
- after ``toolkit archive drop`` (:data:`FROM_MODELS_AND_IDS`): the same, from the ids
  milestone 4 kept for good (``toolkit.mlflow_experiment_ids``), experiment tags being
  the models' metadata.

The fingerprint's MLflow half (:mod:`toolkit.verify.mlflow_parts`), the MLflow server's
reads and writes (:mod:`toolkit.mlflow_api`) and milestone 1's plan all read experiments
through these, so what is compared is what clients see.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists, relation_exists
from toolkit.names import M3_CREATED_MODELS as CREATED_MODELS
from toolkit.names import (
    M4_ARCHIVE_EXPERIMENTS,
    M4_ARCHIVE_METADATA,
    M4_EXPERIMENT_IDS,
)

FROM_EXPERIMENTS = "experiments"


FROM_MODELS = "models"


FROM_MODELS_AND_ARCHIVE = "models + archive"


FROM_MODELS_AND_IDS = "models + kept experiment ids"  # after `toolkit archive drop`


def mlflow_source(conn: Connection) -> str | None:
    if relation_exists(conn, "ml_experiments"):
        return FROM_MODELS if column_exists(conn, "ml_models", "display_name") else FROM_EXPERIMENTS
    if relation_exists(conn, M4_ARCHIVE_EXPERIMENTS):
        return FROM_MODELS_AND_ARCHIVE
    # after `toolkit archive drop`: the ids milestone 4 kept
    return FROM_MODELS_AND_IDS if relation_exists(conn, M4_EXPERIMENT_IDS) else None


def experiment_relations(source: str) -> tuple[str, str]:
    """Where experiments and their tags are read: the live tables, the archive, or after the
    archive drop the kept ids with their models' metadata as tags (``experiment_id``,
    ``id``, ``name``, ``value``)."""
    if source == FROM_MODELS_AND_ARCHIVE:
        return M4_ARCHIVE_EXPERIMENTS, M4_ARCHIVE_METADATA
    if source == FROM_MODELS_AND_IDS:
        return M4_EXPERIMENT_IDS, (f"(SELECT k.id AS experiment_id, mm.id, mm.name, mm.value "
                                   f"FROM {M4_EXPERIMENT_IDS} k JOIN ml_model_metadata mm "
                                   "ON mm.model_id = k.model_id)")
    return "ml_experiments", "ml_experiment_metadata"


def experiments_view(conn: Connection, source: str, where: str = "true") -> str:
    """The experiments as an MLflow client sees them at this stage, one row each: ``id``
    (of the experiment row), ``project_id``, ``iid``, ``name``, ``deleted_on``,
    ``created_at``, ``model_id``. ``where`` filters the experiment rows (alias ``x``)."""
    experiments, _ = experiment_relations(source)
    if source == FROM_EXPERIMENTS:
        return f"""
            SELECT x.id, x.project_id, x.iid, x.name, x.deleted_on, x.created_at, x.model_id
            FROM ml_experiments x WHERE {where}"""
    created = (f"SELECT model_id FROM {CREATED_MODELS}" if relation_exists(conn, CREATED_MODELS)
               else "SELECT NULL::bigint AS model_id WHERE false")
    return f"""
        SELECT x.id, COALESCE(m.project_id, x.project_id) AS project_id, x.iid,
               CASE WHEN cm.model_id IS NOT NULL THEN m.display_name ELSE x.name END AS name,
               x.deleted_on, x.created_at, x.model_id
        FROM {experiments} x LEFT JOIN ml_models m ON m.id = x.model_id
        LEFT JOIN ({created}) cm ON cm.model_id = x.model_id
        WHERE {where}"""


def run_parent(conn: Connection, source: str) -> str:
    """The join that gives a candidate ``c`` its experiment ``x`` (``project_id``, ``iid``)."""
    experiments, _ = experiment_relations(source)
    if source == FROM_EXPERIMENTS:
        return "LEFT JOIN ml_experiments x ON x.id = c.experiment_id"
    # a candidate reaches its experiment through its model; one the backfill has not
    # reached yet (milestone 3 in progress) still through experiment_id
    if column_exists(conn, "ml_candidates", "experiment_id"):
        return f"""LEFT JOIN {experiments} xm ON xm.model_id = c.model_id
            LEFT JOIN {experiments} xe ON xe.id = c.experiment_id AND c.model_id IS NULL
            CROSS JOIN LATERAL (SELECT COALESCE(xm.project_id, xe.project_id) AS project_id,
                                       COALESCE(xm.iid, xe.iid) AS iid) x"""
    return f"LEFT JOIN {experiments} x ON x.model_id = c.model_id"


def runs_of_experiment(conn: Connection, source: str) -> str:
    """The condition on a candidate ``c`` that :func:`run_parent` maps to the experiment
    whose row id is ``:experiment_row`` and whose model is ``:experiment_model``, written
    so an index answers it (``experiment_id``, ``model_id``)."""
    if source == FROM_EXPERIMENTS:
        return "c.experiment_id = :experiment_row"
    if column_exists(conn, "ml_candidates", "experiment_id"):
        return ("(c.model_id = :experiment_model OR "
                "(c.model_id IS NULL AND c.experiment_id = :experiment_row))")
    return "c.model_id = :experiment_model"
