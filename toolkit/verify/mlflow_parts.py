"""The MLflow half of the fingerprint: the SQL of each part (one text row ``r`` per row an
MLflow client would see, with its key ``k`` where the part is :data:`KEYED`), the GitLab
tables each is made from (:data:`PART_TABLES`), and which parts a stage cannot compute as
before (:data:`NOT_COMPARABLE`). Each part reads experiments through the stage's view
(:mod:`toolkit.verify.mlflow_view`).
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from toolkit.catalog import relation_exists
from toolkit.mlflow_api.artifact_uri import artifact_path_sql
from toolkit.names import M3_COPIED_METADATA as COPIED_METADATA
from toolkit.names import M3_CREATED_MODELS as CREATED_MODELS
from toolkit.verify.mlflow_view import FROM_MODELS_AND_IDS, experiment_relations, experiments_view, run_parent

# What a stage cannot compute as before: after the archive drop the experiments' own tags
# are gone; a blueprint-complete GitLab shows the model's metadata (milestone 3 copied them
# there; a clash kept the model's value). Declared, not compared.
NOT_COMPARABLE = {FROM_MODELS_AND_IDS: ("experiment_tags",)}


# The GitLab tables whose rows make each MLflow part (after milestone 4 the archive stands
# in for the two dropped tables). A part none of whose tables a milestone's runs wrote is
# unchanged by that milestone.
PART_TABLES: dict[str, tuple[str, ...]] = {
    "experiments": ("ml_experiments", "ml_models"),
    "experiment_tags": ("ml_experiment_metadata", "ml_experiments"),
    "runs": ("ml_candidates", "ml_experiments"),
    "run_params": ("ml_candidate_params",),
    "run_metrics_latest": ("ml_candidate_metrics",),
    "run_metrics_history": ("ml_candidate_metrics",),
    "run_tags": ("ml_candidate_metadata",),
    "run_artifact_uris": ("ml_candidates", "packages_packages", "ml_experiments", "ml_models"),
    # the registry as get_registered_model shows it (models milestone 3 created and the
    # metadata it copied left out: a declared difference, proven by its ledgers)
    "registered_models": ("ml_models",),
    "registered_model_tags": ("ml_model_metadata",),
    "model_versions": ("ml_model_versions", "ml_candidates"),
    "model_version_tags": ("ml_model_version_metadata",),
}


# Parts whose rows carry a key (``k``): their digest is also kept per bucket of keys, so a
# difference names the runs, models or experiments it is in, and ``verify`` can tell a
# difference confined to what MLflow clients wrote through the server since the baseline
# (toolkit/verify/app_writes.py). Not the metric parts: no milestone's baseline reads them
# (no milestone writes ml_candidate_metrics), and grouping 10M rows would slow every whole
# fingerprint. (the key's table, what a key names)
KEYED: dict[str, tuple[str, str]] = {
    "experiments": ("ml_experiments", "experiment"),
    "experiment_tags": ("ml_experiments", "experiment"),
    "runs": ("ml_candidates", "run"),
    "run_params": ("ml_candidates", "run"),
    "run_tags": ("ml_candidates", "run"),
    "run_artifact_uris": ("ml_candidates", "candidate"),
    "registered_models": ("ml_models", "model"),
    "registered_model_tags": ("ml_models", "model"),
    "model_versions": ("ml_model_versions", "model version"),
    "model_version_tags": ("ml_model_versions", "model version"),
}


def mlflow_parts(conn: Connection, source: str) -> dict[str, str]:
    """The SQL of each part: one text column ``r`` per row an MLflow client would see."""
    experiments, tags = experiment_relations(source)
    experiment_rows = f"""
        SELECT ROW(e.project_id, e.iid, e.name, e.deleted_on IS NOT NULL)::text AS r, e.id AS k
        FROM ({experiments_view(conn, source, "x.id <= :w_experiments")}) e"""
    parent = run_parent(conn, source)
    created = relation_exists(conn, CREATED_MODELS)
    not_created = f"NOT IN (SELECT model_id FROM {CREATED_MODELS})" if created else "IS NOT NULL"
    not_copied = (f"mm.id NOT IN (SELECT model_metadata_id FROM {COPIED_METADATA})"
                  if relation_exists(conn, COPIED_METADATA) else "true")
    uri = artifact_path_sql(conn, experiments, canonical=True)
    parts = {
        "experiments": experiment_rows,
        "experiment_tags": f"""
            SELECT ROW(x.project_id, x.iid, t.name, t.value)::text AS r, x.id AS k
            FROM {tags} t JOIN {experiments} x ON x.id = t.experiment_id
            WHERE t.id <= :w_experiment_metadata""",
        "runs": f"""
            SELECT ROW(c.id, c.eid, x.project_id, x.iid, c.name, c.status, c.start_time,
                       c.end_time, c.user_id, c.package_id, c.internal_id)::text AS r, c.id AS k
            FROM ml_candidates c {parent} WHERE c.id <= :w_candidates""",
        "run_params": """
            SELECT ROW(p.candidate_id, p.name, p.value)::text AS r, p.candidate_id AS k
            FROM ml_candidate_params p WHERE p.id <= :w_params""",
        "run_metrics_latest": """
            SELECT DISTINCT ON (x.candidate_id, x.name)
                   ROW(x.candidate_id, x.name, x.value, x.step, x.tracked_at, x.is_nan)::text AS r
            FROM ml_candidate_metrics x WHERE x.id <= :w_metrics
            ORDER BY x.candidate_id, x.name, x.id DESC""",
        "run_metrics_history": """
            SELECT ROW(x.candidate_id, x.name, x.value, x.step, x.tracked_at, x.is_nan)::text AS r
            FROM ml_candidate_metrics x WHERE x.id <= :w_metrics""",
        "run_tags": """
            SELECT ROW(t.candidate_id, t.name, t.value)::text AS r, t.candidate_id AS k
            FROM ml_candidate_metadata t WHERE t.id <= :w_candidate_metadata""",
        "run_artifact_uris": f"""
            SELECT ROW(c.id, {uri}, pk.id, pk.project_id, pk.name, pk.version)::text AS r, c.id AS k
            FROM ml_candidates c LEFT JOIN packages_packages pk ON pk.id = c.package_id
            WHERE c.id <= :w_candidates""",
        "registered_models": f"""
            SELECT ROW(m.id, m.project_id, m.name, m.description, m.user_id, m.created_at,
                       m.updated_at)::text AS r, m.id AS k
            FROM ml_models m WHERE m.id <= :w_models AND m.id {not_created}""",
        "registered_model_tags": f"""
            SELECT ROW(mm.model_id, mm.name, mm.value)::text AS r, mm.model_id AS k
            FROM ml_model_metadata mm WHERE mm.id <= :w_model_metadata AND {not_copied}
              AND mm.model_id {not_created}""",
        "model_versions": """
            SELECT ROW(v.id, v.model_id, v.version, v.description, v.created_at, v.updated_at,
                       c.eid)::text AS r, v.id AS k
            FROM ml_model_versions v LEFT JOIN ml_candidates c ON c.model_version_id = v.id
            WHERE v.id <= :w_model_versions""",
        "model_version_tags": """
            SELECT ROW(t.model_version_id, t.name, t.value)::text AS r, t.model_version_id AS k
            FROM ml_model_version_metadata t WHERE t.id <= :w_model_version_metadata""",
    }
    for part in NOT_COMPARABLE.get(source, ()):
        del parts[part]
    return parts


WATERMARK_PARAMS = {
    "w_experiments": "ml_experiments",
    "w_experiment_metadata": "ml_experiment_metadata",
    "w_candidates": "ml_candidates",
    "w_params": "ml_candidate_params",
    "w_metrics": "ml_candidate_metrics",
    "w_candidate_metadata": "ml_candidate_metadata",
    "w_models": "ml_models",
    "w_model_metadata": "ml_model_metadata",
    "w_model_versions": "ml_model_versions",
    "w_model_version_metadata": "ml_model_version_metadata",
}


# MLflow parts that are a function of one table's rows alone: where that table's digest
# equals the reference's (same watermark), the part is equal too and is not recomputed.
# That spares verify two of its three passes over the 10M metric rows at x25.
DERIVED_FROM = {
    "run_params": "ml_candidate_params",
    "run_metrics_latest": "ml_candidate_metrics",
    "run_metrics_history": "ml_candidate_metrics",
    "run_tags": "ml_candidate_metadata",
}
