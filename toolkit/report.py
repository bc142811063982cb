"""The blueprint's "candidate comparison table", data side: a model's candidates with their
params and the latest value of each metric, read through ``ml_candidates.model_id``.

"Latest" is GitLab's definition: per candidate and metric name, the row with the highest
id (``DISTINCT ON (candidate_id, name) ORDER BY id DESC``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine.preflight import check_gitlab_schema
from toolkit.errors import PreconditionRefused
from toolkit.schema.gitlab import CANDIDATE_STATUSES

STATUS_NAMES = {v: k for k, v in CANDIDATE_STATUSES.items()}
READS = ("ml_candidates", "ml_models", "ml_candidate_params", "ml_candidate_metrics")


def candidate_report(conn: Connection, project_id: int, model_name: str, metric: str | None = None,
                     order: str = "desc") -> dict[str, Any]:
    from toolkit import milestones
    from toolkit.milestones.m2_model_parent import NAME as M2

    check_gitlab_schema(conn, READS, may_be_gone=milestones.plan().may_be_gone(conn))
    has_model_id = conn.execute(sa.text(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass "
        "AND attname = 'model_id' AND NOT attisdropped)")).scalar_one()
    if not has_model_id:
        raise PreconditionRefused("ml_candidates has no model_id yet",
                                  f"run `toolkit migrate {M2}` first")
    model = conn.execute(sa.text("SELECT id, name FROM ml_models WHERE project_id = :p AND name = :n"),
                         {"p": project_id, "n": model_name}).one_or_none()
    if model is None:
        raise PreconditionRefused(f"No model named {model_name!r} in project {project_id}",
                                  "check --project and --model (the model's name, not its display name)")
    candidates = [dict(r._mapping) for r in conn.execute(sa.text("""
        SELECT c.id, c.internal_id AS iid, c.eid::text AS eid, c.name, c.status
        FROM ml_candidates c WHERE c.model_id = :m ORDER BY c.internal_id NULLS LAST, c.id
    """), {"m": model.id})]
    by_id = {c["id"]: {**c, "status": STATUS_NAMES.get(c["status"], str(c["status"])),
                       "params": {}, "metrics": {}} for c in candidates}
    for candidate_id, name, value in conn.execute(sa.text("""
        SELECT p.candidate_id, p.name, p.value FROM ml_candidate_params p
        JOIN ml_candidates c ON c.id = p.candidate_id WHERE c.model_id = :m ORDER BY p.name
    """), {"m": model.id}):
        by_id[candidate_id]["params"][name] = value
    metric_names: set[str] = set()
    for candidate_id, name, value in conn.execute(sa.text("""
        SELECT DISTINCT ON (x.candidate_id, x.name) x.candidate_id, x.name, x.value
        FROM ml_candidate_metrics x JOIN ml_candidates c ON c.id = x.candidate_id
        WHERE c.model_id = :m ORDER BY x.candidate_id, x.name, x.id DESC
    """), {"m": model.id}):
        by_id[candidate_id]["metrics"][name] = value
        metric_names.add(name)
    rows = list(by_id.values())
    if metric:
        with_value = [r for r in rows if r["metrics"].get(metric) is not None]
        without = [r for r in rows if r["metrics"].get(metric) is None]
        with_value.sort(key=lambda r: r["metrics"][metric], reverse=order == "desc")
        rows = with_value + without  # candidates without the metric last, either way
    return {"project_id": project_id, "model": {"id": model.id, "name": model.name},
            "metric": metric, "order": order, "metric_names": sorted(metric_names),
            "candidates": rows}
