"""Rows a fingerprint compares by natural key rather than by id.

Models milestone 3's runs created (and what refers to them) take their ids from
sequences, which do not roll back: two databases holding the same data can give them other
ids. ``toolkit fingerprint`` digests those rows apart, a model by project and name, so
two such databases compare equal.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists, relation_exists
from toolkit.names import M3_CREATED_MODELS as CREATED_MODELS

# Rows whose ids come from sequences and may differ between two databases that hold the
# same data: models milestone 3's runs created (and what refers to them) get other ids on a
# database whose batch was rolled back after taking ids from the sequence (a crash, a full
# disk, a lock timeout), since sequences do not roll back. `toolkit fingerprint` digests
# these rows apart, by natural key (a model by project and name), and its --compare says
# which parts it compared that way. Each: which rows, and how they are compared.
NATURAL_KEYS: dict[str, str] = {
    "ml_models": "models milestone-3 created, by project and name, not id",
    "ml_model_metadata": "tags of the models milestone-3 created, by model (project and name) and "
                         "tag, not id",
    "ml_candidates": "runs in the models milestone-3 created, their model by project and name, "
                     "not model_id",
    "ml_experiments": "experiments of the models milestone-3 created, their model by project and "
                      "name, not model_id",
}


_MODEL_KEY = "jsonb_build_object('model', jsonb_build_array(m.project_id, m.name))"


def natural_rows(conn: Connection, table: str) -> tuple[str, str] | None:
    """For a table of :data:`NATURAL_KEYS` once milestone 3 has created models: the
    condition (on ``t``) picking the rows compared by natural key, and a query of their
    text ``r``; None otherwise. The table's own digest leaves those rows out."""
    if table not in NATURAL_KEYS or not relation_exists(conn, CREATED_MODELS) \
            or not relation_exists(conn, table):
        return None
    # only the migration's own models (a run made them): those MLflow clients made through
    # `mlflow serve` (run_id NULL) took their ids as the application's rows do, compared
    # by id up to the watermark like them
    created = f"(SELECT model_id FROM {CREATED_MODELS} WHERE run_id IS NOT NULL)"
    if table == "ml_models":
        condition = f"t.id IN {created}"
        return condition, f"SELECT (to_jsonb(t) - 'id')::text AS r FROM ml_models AS t WHERE {condition}"
    if not column_exists(conn, table, "model_id"):
        return None
    condition = f"t.model_id IN {created}"
    # a model's tags have ids of their own from the sequence; runs and experiments keep theirs
    # (bounded by the watermark as every other row)
    own_id, bound = ("- 'id' ", "") if table == "ml_model_metadata" else ("", " AND t.id <= :w")
    return condition, (f"SELECT (to_jsonb(t) {own_id}- 'model_id' || {_MODEL_KEY})::text AS r "
                       f"FROM {table} AS t JOIN ml_models m ON m.id = t.model_id "
                       f"WHERE {condition}{bound}")
