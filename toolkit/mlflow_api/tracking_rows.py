"""What the tracking writes share: finding the run or experiment a request names, reading
back the answer, recording every row written, and an experiment's or run's tag (metadata)
row with GitLab's validations.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.mlflow_api import rails, stages
from toolkit.mlflow_api.declared import blank, metadata_validation, validation_failed
from toolkit.mlflow_api.errors import invalid_parameter, resource_not_found
from toolkit.mlflow_api.stages import WriteContext
from toolkit.mlflow_api.views import View


def find_candidate(conn: Connection, ctx: WriteContext, params: dict[str, Any], *,
                   for_update: bool = False) -> sa.Row:
    """``find_candidate!(params[:run_id])``: the project's candidate whose eid it is (Rails
    casts a malformed uuid to nil: no candidate), locked for the write."""
    given = rails.grape_string(params, "run_id", required=True)
    eid = rails.uuid_cast(given) if given else None
    row = None
    if eid is not None:
        row = conn.execute(sa.text(f"""
            SELECT id, project_id, eid, model_version_id FROM ml_candidates
            WHERE project_id = :p AND eid = CAST(:eid AS uuid)
            FOR {'UPDATE' if for_update else 'SHARE'}"""), {"p": ctx.project_id, "eid": eid}).first()
    if row is None:
        raise resource_not_found()
    return row


def find_experiment(conn: Connection, ctx: WriteContext, iid: Any) -> stages.ExperimentRef:
    """``find_experiment!(params[:experiment_id], …)`` (Rails casts the iid as an integer)."""
    number = rails.integer_cast(iid) if iid is not None else None
    found = stages.find_experiment(conn, ctx.stage, ctx.project_id, number) if number is not None else None
    if found is None:
        raise resource_not_found()
    return found


def view_of(conn: Connection, ctx: WriteContext) -> View:
    """The reads' view of the project, for an answer that is the row as a read gives it."""
    return View(conn, str(ctx.project_id), ctx.base_url)


def record(conn: Connection, ctx: WriteContext, table: str, row_ids: list[int], action: str, *,
           candidate_id: int | None = None, model_id: int | None = None) -> None:
    for row_id in row_ids:
        stages.record_write(conn, ctx.endpoint, table, row_id, action, candidate_id=candidate_id,
                            model_id=model_id)


def tag_pairs(tags: list[Any] | None) -> list[tuple[str, str]]:
    """``add_tags``' rows: ``insert_all`` skips a key already inserted (its unique index),
    so the first of a repeated key is kept. A tag without a value fails as GitLab's
    insert fails (NOT NULL)."""
    pairs: dict[str, str] = {}
    for tag in tags or []:
        if not isinstance(tag, dict):
            raise invalid_parameter("tags must be a list of {key, value}")
        key, value = tag.get("key"), tag.get("value")
        if key is None or value is None or isinstance(key, (list, dict)) or isinstance(value, (list, dict)):
            raise invalid_parameter("null value in a tag: every tag needs a key and a value")
        pairs.setdefault(str(key), str(value))
    return list(pairs.items())


def add_metadata(conn: Connection, ctx: WriteContext, table: str, parent: str, parent_id: int,
                 key: str | None, value: str | None, **recorded: int | None) -> None:
    """``metadata.create!`` of an experiment or a run: GitLab's validations (a taken name is
    ``RecordInvalid``), then the row, recorded."""
    errors = _metadata_errors(conn, table, parent, parent_id, key, value)
    if errors:
        raise validation_failed(*errors)
    row = conn.execute(sa.text(f"""
        INSERT INTO {table} (created_at, updated_at, {parent}, name, value, project_id)
        VALUES (now(), now(), :parent, :k, :v, :p) RETURNING id"""),
        {"parent": parent_id, "k": key, "v": value, "p": ctx.project_id}).scalar_one()
    record(conn, ctx, table, [row], "insert", **recorded)


def _metadata_errors(conn: Connection, table: str, parent: str, parent_id: int, key: str | None,
                     value: str | None) -> list[str]:
    """``Ml::ExperimentMetadata`` / ``CandidateMetadata`` validations over ``table``."""
    taken = not blank(key) and conn.execute(sa.text(
        f"SELECT EXISTS (SELECT 1 FROM {table} WHERE {parent} = :id AND name = :k)"),
        {"id": parent_id, "k": key}).scalar_one()
    return metadata_validation(key, value, taken)
