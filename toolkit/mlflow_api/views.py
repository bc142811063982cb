"""The answers of GitLab's MLflow read endpoints, from one connection, at any stage.

Every answer is built the way GitLab's API builds it (``reference/001_…`` and GitLab's
``lib/api/ml/mlflow``, ``lib/api/entities/ml/mlflow``): ``experiment_id`` is the
experiment's per-project iid as a string, ``run_id`` and ``run_uuid`` the candidate's
``eid``. Which tables hold experiments and how a run reaches its experiment depend on the
stage; that knowledge lives in one place, the fingerprint's MLflow view
(:func:`toolkit.verify.fingerprint.experiments_view`, ``run_parent``,
``runs_of_experiment``), so what the server answers is what ``verify`` proves unchanged.

Pages are keyset pages (GitLab's ``keyset_paginate``): the token carries the last row's
sort value and id, so a page costs the same wherever it is, and a run is seen exactly once
while milestones move rows under a paging client.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import relation_exists
from toolkit.engine.state import ROLLING_BACK, milestone_state
from toolkit.names import M4_ARCHIVE_EXPERIMENTS
from toolkit.schema.gitlab import CANDIDATE_STATUSES
from toolkit.verify.fingerprint import (
    FROM_MODELS,
    FROM_MODELS_AND_ARCHIVE,
    experiment_relations,
    experiments_view,
    mlflow_source,
    run_parent,
    runs_of_experiment,
)

# GitLab caps every page at 1000 (runs/search, experiments/search, metrics/get-history).
MAX_PAGE = 1000
STATUS_NAMES = {number: name.upper() for name, number in CANDIDATE_STATUSES.items()}
BIGINT_MAX = 2**63 - 1


class ApiError(Exception):
    """An MLflow error document: HTTP status, ``error_code`` and message."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message

    def document(self) -> dict[str, str]:
        return {"error_code": self.error_code, "message": self.message}


def not_found(message: str) -> ApiError:
    return ApiError(404, "RESOURCE_DOES_NOT_EXIST", message)


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_PARAMETER_VALUE", message)


# --- parameters ---------------------------------------------------------------------------
def required(params: dict[str, Any], *names: str) -> str:
    """The first of ``names`` given (``run_id``, then ``run_uuid``), as a string."""
    for name in names:
        value = params.get(name)
        if value not in (None, ""):
            return str(value)
    raise invalid(f"Missing value for required parameter '{names[0]}'")


def page_size(params: dict[str, Any], default: int, limit: int) -> int:
    raw = params.get("max_results")
    if raw in (None, ""):
        return min(default, limit)
    try:
        size = int(raw)
    except (TypeError, ValueError):
        raise invalid(f"max_results must be a positive integer, not {raw!r}") from None
    if size < 1:
        raise invalid(f"max_results must be a positive integer, not {size}")
    return min(size, limit)


@dataclass(frozen=True)
class Order:
    """A keyset order: a sort expression, its kind, and the direction (the id breaks ties
    in the same direction)."""

    column: str
    descending: bool

    @property
    def text(self) -> str:
        return f"{self.column} {'DESC' if self.descending else 'ASC'}"


def parse_order(raw: Any, columns: tuple[str, ...], default: Order) -> Order:
    """The first ``order_by`` entry (GitLab reads one); an unknown column gives the default,
    as GitLab's finders do. Ordering by a metric is refused: it cannot be paged by keyset."""
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    if not raw:
        return default
    words = str(raw).split()
    column = words[0].removeprefix("attributes.").removeprefix("attribute.")
    if column.startswith(("metrics.", "metric.", "params.", "param.", "tags.", "tag.")):
        raise invalid(f"order_by {raw!r}: toolkit mlflow serve orders by "
                      f"{', '.join(columns)} only")
    if column not in columns:
        return default
    descending = len(words) > 1 and words[1].upper() == "DESC"
    return Order(column, descending)


def _encode_token(order: Order, value: Any, row_id: int) -> str:
    raw = json.dumps({"o": order.text, "k": [value, row_id]}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: Any, order: Order) -> tuple[Any, int] | None:
    if token in (None, ""):
        return None
    try:
        text = str(token)
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        value, row_id = data["k"]
        if data["o"] != order.text or type(row_id) is not int:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise invalid(f"page_token {str(token)[:80]!r} is not a token this server gave for "
                      "this order_by") from None
    return value, row_id


def _keyset(order: Order, sort_sql: str, id_sql: str, cast: str, token: Any,
            params: dict[str, Any]) -> tuple[str, str]:
    """The WHERE condition after the token's row (``true`` without one) and the ORDER BY."""
    direction = "DESC" if order.descending else "ASC"
    ordering = f"{sort_sql} {direction}, {id_sql} {direction}"
    after = _decode_token(token, order)
    if after is None:
        return "true", ordering
    value = after[0]
    if value is not None and not (type(value) is int if cast == "bigint" else isinstance(value, str)):
        raise invalid(f"page_token {str(token)[:80]!r} is not a token this server gave for this order_by")
    params["k_value"], params["k_id"] = after
    op = "<" if order.descending else ">"
    return f"({sort_sql}, {id_sql}) {op} (CAST(:k_value AS {cast}), :k_id)", ordering


def _sort_value(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


# --- values as MLflow's JSON carries them ---------------------------------------------------
def metric_value(value: float | None, is_nan: bytes | None) -> float | str:
    """NaN (GitLab stores it as ``is_nan`` and no value) and infinities as protobuf's JSON
    strings, which every MLflow client parses."""
    if value is None or (is_nan is not None and any(bytes(is_nan))):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _integer(text: str) -> int | None:
    """A bigint id written in ASCII digits, else None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > BIGINT_MAX:
        return None
    return int(text)


def _key_values(rows: list[sa.Row]) -> list[dict[str, str]]:
    return [{"key": r.name, "value": r.value} for r in rows]


class View:
    """One project's MLflow API over one connection (one request's READ ONLY transaction)."""

    def __init__(self, conn: Connection, project: str, base_url: str):
        self.conn = conn
        self.base_url = base_url
        project_id = _integer(project)
        if project_id is None:
            raise not_found(f"Project {project[:80]!r} not found: give the project's numeric id")
        self.project_id = project_id
        if conn.execute(sa.text("SELECT count(*) FROM projects WHERE id = :p"),
                        {"p": self.project_id}).scalar_one() == 0:
            raise not_found(f"Project {self.project_id} not found")
        source = reading_source(conn)
        if source is None:
            raise not_found("This database has no experiments: ml_experiments and the toolkit's "
                            "archive of it are both absent")
        self.source = source
        _, self.tags_relation = experiment_relations(source)

    def _rows(self, sql: str, params: dict[str, Any]) -> list[sa.Row]:
        return list(self.conn.execute(sa.text(sql), params))

    # -- experiments -------------------------------------------------------------------
    def _experiments(self, where: str, params: dict[str, Any], tail: str = "") -> list[sa.Row]:
        view = experiments_view(self.conn, self.source, "x.project_id = :project")
        return self._rows(f"SELECT e.* FROM ({view}) e WHERE e.project_id = :project AND {where} {tail}",
                          {"project": self.project_id, **params})

    def _experiment(self, by_iid: str | None = None, by_name: str | None = None) -> sa.Row:
        if by_iid is not None:
            iid = _integer(by_iid)
            if iid is None:
                raise invalid(f"experiment_id must be an experiment's id (an integer), not {by_iid[:80]!r}")
            found = self._experiments("e.iid = :iid", {"iid": iid})
            what = f"id {by_iid}"
        else:
            found = self._experiments("e.name = :name", {"name": by_name})
            what = f"name {by_name!r}"
        if not found:
            raise not_found(f"No experiment with {what} in project {self.project_id}")
        return found[0]

    def _experiment_documents(self, rows: list[sa.Row]) -> list[dict[str, Any]]:
        tags: dict[int, list[sa.Row]] = {row.id: [] for row in rows}
        if rows:
            for tag in self._rows(f"""SELECT t.experiment_id, t.name, t.value FROM {self.tags_relation} t
                                      WHERE t.experiment_id = ANY(:ids) ORDER BY t.experiment_id, t.name""",
                                  {"ids": list(tags)}):
                tags[tag.experiment_id].append(tag)
        return [{"experiment_id": str(row.iid), "name": row.name,
                 "lifecycle_stage": "deleted" if row.deleted_on is not None else "active",
                 "artifact_location": "not_implemented", "tags": _key_values(tags[row.id])}
                for row in rows]

    def get_experiment(self, params: dict[str, Any]) -> dict[str, Any]:
        row = self._experiment(by_iid=required(params, "experiment_id"))
        return {"experiment": self._experiment_documents([row])[0]}

    def get_experiment_by_name(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("experiment_name")
        if name is None:
            raise invalid("Missing value for required parameter 'experiment_name'")
        return {"experiment": self._experiment_documents([self._experiment(by_name=str(name))])[0]}

    EXPERIMENT_ORDER = Order("created_at", True)  # GitLab's default for experiments/search
    EXPERIMENT_COLUMNS = ("created_at", "name", "id")

    def search_experiments(self, params: dict[str, Any], limit: int) -> dict[str, Any]:
        size = page_size(params, 200, limit)
        order = parse_order(params.get("order_by"), self.EXPERIMENT_COLUMNS, self.EXPERIMENT_ORDER)
        rows, token = self._experiment_page(order, size, params.get("page_token"))
        found: dict[str, Any] = {"experiments": self._experiment_documents(rows)}
        if token:
            found["next_page_token"] = token
        return found

    def _experiment_page(self, order: Order, size: int, token: Any) -> tuple[list[sa.Row], str | None]:
        sort, cast = {"created_at": ("e.created_at", "timestamptz"), "name": ("e.name", "text"),
                      "id": ("e.id", "bigint")}[order.column]
        keyed: dict[str, Any] = {"n": size + 1}
        where, ordering = _keyset(order, sort, "e.id", cast, token, keyed)
        rows = self._experiments(where, keyed, f"ORDER BY {ordering} LIMIT :n")
        return self._paged(rows, size, order, lambda row: getattr(row, order.column))

    @staticmethod
    def _paged(rows: list[sa.Row], size: int, order: Order, sort_value) -> tuple[list[sa.Row], str | None]:
        if len(rows) <= size:
            return rows, None
        last = rows[size - 1]
        return rows[:size], _encode_token(order, _sort_value(sort_value(last)), last.id)

    # -- runs --------------------------------------------------------------------------
    RUN_COLUMNS = """c.id, c.eid, c.name, c.status, c.start_time, c.end_time, c.user_id,
        c.created_at, pk.project_id AS package_project, pk.name AS package_name,
        pk.version AS package_version"""
    RUN_ORDER = Order("created_at", True)  # GitLab's default for runs/search
    RUN_SORT: ClassVar[dict[str, tuple[str, str]]] = {
        "created_at": ("c.created_at", "timestamptz"), "name": ("COALESCE(c.name, '')", "text"),
        "id": ("c.id", "bigint")}

    def _run(self, params: dict[str, Any], *, with_experiment: bool = True) -> sa.Row:
        """The candidate whose eid is ``run_id`` in the project (GitLab's ``find_candidate!``),
        with its experiment's iid (a run no experiment reaches is not found)."""
        eid = required(params, "run_id", "run_uuid")
        try:
            uuid.UUID(eid)
        except ValueError:
            raise not_found(f"No run with id {eid[:80]!r} in project {self.project_id}") from None
        parent, iid = ((run_parent(self.conn, self.source), "x.iid") if with_experiment
                       else ("", "0"))
        found = self._rows(f"""
            SELECT {self.RUN_COLUMNS}, {iid} AS experiment_iid FROM ml_candidates c {parent}
            LEFT JOIN packages_packages pk ON pk.id = c.package_id
            WHERE c.project_id = :project AND c.eid = CAST(:eid AS uuid)""",
            {"project": self.project_id, "eid": eid})
        if not found or found[0].experiment_iid is None:
            raise not_found(f"No run with id {eid} in project {self.project_id}")
        return found[0]

    def get_run(self, params: dict[str, Any]) -> dict[str, Any]:
        run = self._run(params)
        return {"run": self._run_documents([run], str(run.experiment_iid))[0]}

    def search_runs(self, params: dict[str, Any], limit: int) -> dict[str, Any]:
        ids = params.get("experiment_ids")
        if isinstance(ids, str):
            ids = [ids]
        if not ids:
            raise invalid("Missing value for required parameter 'experiment_ids'")
        experiment = self._experiment(by_iid=str(ids[0]))  # GitLab reads the first one only
        size = page_size(params, 200, limit)
        order = parse_order(params.get("order_by"), tuple(self.RUN_SORT), self.RUN_ORDER)
        sort, cast = self.RUN_SORT[order.column]
        keyed: dict[str, Any] = {"n": size + 1, "experiment_row": experiment.id,
                                 "experiment_model": experiment.model_id}
        where, ordering = _keyset(order, sort, "c.id", cast, params.get("page_token"), keyed)
        rows = self._rows(f"""
            SELECT {self.RUN_COLUMNS} FROM ml_candidates c
            LEFT JOIN packages_packages pk ON pk.id = c.package_id
            WHERE {runs_of_experiment(self.conn, self.source)} AND {where}
            ORDER BY {ordering} LIMIT :n""", keyed)
        page, token = self._paged(rows, size, order, lambda row: {
            "created_at": row.created_at, "name": row.name or "", "id": row.id}[order.column])
        found: dict[str, Any] = {"runs": self._run_documents(page, str(experiment.iid))}
        if token:
            found["next_page_token"] = token
        return found

    def _artifact_uri(self, run: sa.Row) -> str:
        """The run's package, by its name and version (which no milestone changes); the
        toolkit serves no artifacts, and a run without a package has none."""
        if run.package_name is None:
            return ""
        return (f"{self.base_url}/api/v4/projects/{run.package_project}/packages/generic/"
                f"{quote(run.package_name, safe='')}/{quote(run.package_version or '', safe='')}/")

    def _run_documents(self, runs: list[sa.Row], experiment_id: str) -> list[dict[str, Any]]:
        ids = [run.id for run in runs]
        data: dict[int, dict[str, list]] = {i: {"metrics": [], "params": [], "tags": []} for i in ids}
        if ids:  # one round trip for the three: latest metrics, params, tags
            for r in self._rows("""
                    SELECT * FROM (
                        SELECT DISTINCT ON (m.candidate_id, m.name) 'metrics' AS part, m.candidate_id,
                               m.name, NULL::text AS value, m.value AS number, m.is_nan, m.step, m.tracked_at
                        FROM ml_candidate_metrics m WHERE m.candidate_id = ANY(:ids)
                        ORDER BY m.candidate_id, m.name, m.id DESC) latest
                    UNION ALL
                    SELECT 'params', t.candidate_id, t.name, t.value, NULL, NULL, NULL, NULL
                    FROM ml_candidate_params t WHERE t.candidate_id = ANY(:ids)
                    UNION ALL
                    SELECT 'tags', t.candidate_id, t.name, t.value, NULL, NULL, NULL, NULL
                    FROM ml_candidate_metadata t WHERE t.candidate_id = ANY(:ids)
                    ORDER BY candidate_id, part, name""", {"ids": ids}):
                data[r.candidate_id][r.part].append(
                    _metric(r.name, r.number, r.is_nan, r.step, r.tracked_at) if r.part == "metrics"
                    else {"key": r.name, "value": r.value})
        documents = []
        for run in runs:
            info: dict[str, Any] = {
                "run_id": str(run.eid), "run_uuid": str(run.eid), "experiment_id": experiment_id,
                "start_time": run.start_time or 0,
                "status": STATUS_NAMES.get(run.status, str(run.status)),
                "artifact_uri": self._artifact_uri(run), "lifecycle_stage": "active",
                "user_id": "" if run.user_id is None else str(run.user_id)}
            if run.end_time is not None:
                info["end_time"] = run.end_time
            if run.name is not None:
                info["run_name"] = run.name
            documents.append({"info": info, "data": data[run.id]})
        return documents

    def metric_history(self, params: dict[str, Any], limit: int) -> dict[str, Any]:
        run = self._run(params, with_experiment=False)
        key = required(params, "metric_key")
        size = page_size(params, MAX_PAGE, limit)
        after = 0
        if token := params.get("page_token"):
            decoded = _decode_token(token, Order("id", False))
            after = decoded[1] if decoded else 0
        rows = self._rows("""
            SELECT m.id, m.name, m.value, m.is_nan, m.step, m.tracked_at FROM ml_candidate_metrics m
            WHERE m.candidate_id = :c AND m.name = :key AND m.id > :after ORDER BY m.id LIMIT :n""",
            {"c": run.id, "key": key, "after": after, "n": size + 1})
        page, token = self._paged(rows, size, Order("id", False), lambda row: row.id)
        found: dict[str, Any] = {"metrics": [_metric(m.name, m.value, m.is_nan, m.step, m.tracked_at)
                                              for m in page]}
        if token:
            found["next_page_token"] = token
        return found

    # -- registry ------------------------------------------------------------------------
    def registered_model(self, params: dict[str, Any]) -> dict[str, Any]:
        name = required(params, "name")
        found = self._rows("""SELECT id, name, created_at, updated_at, description, user_id FROM ml_models
                              WHERE project_id = :project AND name = :name""",
                           {"project": self.project_id, "name": name})
        if not found:
            raise not_found(f"No registered model named {name!r} in project {self.project_id}")
        model = found[0]
        tags = self._rows("SELECT name, value FROM ml_model_metadata WHERE model_id = :m ORDER BY name",
                          {"m": model.id})
        versions = self._rows("""
            SELECT v.id, v.version, v.created_at, v.updated_at, v.description, c.eid
            FROM ml_model_versions v LEFT JOIN ml_candidates c ON c.model_version_id = v.id
            WHERE v.model_id = :m ORDER BY v.id""", {"m": model.id})
        version_tags: dict[int, list[sa.Row]] = {v.id: [] for v in versions}
        if versions:
            for tag in self._rows("""SELECT model_version_id, name, value FROM ml_model_version_metadata
                                     WHERE model_version_id = ANY(:ids) ORDER BY model_version_id, name""",
                                  {"ids": list(version_tags)}):
                version_tags[tag.model_version_id].append(tag)
        return {"registered_model": {
            # GitLab gives these timestamps in seconds
            "name": model.name, "creation_timestamp": int(model.created_at.timestamp()),
            "last_updated_timestamp": int(model.updated_at.timestamp()),
            "description": model.description or "",
            "user_id": "" if model.user_id is None else str(model.user_id),
            "tags": _key_values(tags),
            "latest_versions": [{
                "name": model.name, "version": str(v.id),
                "creation_timestamp": int(v.created_at.timestamp()),
                "last_updated_timestamp": int(v.updated_at.timestamp()),
                "current_stage": "development", "description": v.description or "",
                "run_id": "" if v.eid is None else str(v.eid), "status": "READY",
                "status_message": "", "tags": _key_values(version_tags[v.id]), "run_link": "",
                "aliases": [v.version]} for v in versions],
        }}


def reading_source(conn: Connection) -> str | None:
    """The fingerprint's source, but while milestone 4 is being rolled back the archive:
    it is whole until the rollback drops it, while the rebuilt tables are refilled in
    batches (a fingerprint is never taken in between; a client may read then)."""
    source = mlflow_source(conn)
    if (source == FROM_MODELS and relation_exists(conn, M4_ARCHIVE_EXPERIMENTS)
            and milestone_state(conn, "milestone-4")["state"] == ROLLING_BACK):
        return FROM_MODELS_AND_ARCHIVE
    return source


def _metric(name: str, value: float | None, is_nan: bytes | None, step: int | None,
            tracked_at: int | None) -> dict[str, Any]:
    found: dict[str, Any] = {"key": name, "value": metric_value(value, is_nan)}
    if tracked_at is not None:
        found["timestamp"] = tracked_at
    if step is not None:
        found["step"] = step
    return found
