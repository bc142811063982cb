"""The answers of GitLab's MLflow read endpoints, from one connection, at any stage.

Every answer is built the way GitLab's API builds it (``lib/api/ml/mlflow/*.rb``, the
entities in ``lib/api/entities/ml/mlflow``, the finders in ``app/finders/projects/ml``;
``docs/mlflow.md`` names the files and commits): ``experiment_id`` is the experiment's
per-project iid as a string, ``run_id`` and ``run_uuid`` the candidate's ``eid``; errors
come in GitLab's three shapes (:mod:`toolkit.mlflow_api.errors`), parameters are read as
Grape and Rails read them (:mod:`toolkit.mlflow_api.rails`), the project as
``find_project!`` finds it (:mod:`toolkit.mlflow_api.projects`), rows in GitLab's order
(:mod:`toolkit.mlflow_api.ordering`). Which tables hold experiments and how a run reaches
its experiment depend on the stage; that knowledge lives in one place, the fingerprint's
MLflow view (:func:`toolkit.verify.mlflow_view.experiments_view`, ``run_parent``,
``runs_of_experiment``), so what the server answers is what ``verify`` proves unchanged.

Pages are keyset pages (GitLab's ``keyset_paginate``): the token carries the last row's
sort values, so a page costs the same wherever it is, and a run is seen exactly once
while milestones move rows under a paging client.
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import relation_exists
from toolkit.engine.results import MilestoneState
from toolkit.engine.state import milestone_state
from toolkit.milestones.m4 import NAME as M4
from toolkit.mlflow_api import rails
from toolkit.mlflow_api.artifact_uri import artifact_path_sql, artifact_uri
from toolkit.mlflow_api.errors import ApiError, grape_errors, invalid_parameter, resource_not_found
from toolkit.mlflow_api.ordering import (
    EXPERIMENT_LIST,
    METRIC_HISTORY,
    Ordering,
    experiment_ordering,
    order_text,
    run_ordering,
)
from toolkit.mlflow_api.projects import resolve_project
from toolkit.names import M4_ARCHIVE_EXPERIMENTS
from toolkit.schema.gitlab import CANDIDATE_STATUSES
from toolkit.verify.mlflow_view import (
    FROM_MODELS,
    FROM_MODELS_AND_ARCHIVE,
    experiment_relations,
    experiments_view,
    mlflow_source,
    run_parent,
    runs_of_experiment,
)

__all__ = ["MAX_PAGE", "ApiError", "View", "reading_source"]

# GitLab caps every page at 1000 (runs/search, experiments/search, metrics/get-history).
MAX_PAGE = 1000
STATUS_NAMES = {number: name.upper() for name, number in CANDIDATE_STATUSES.items()}


# --- values as MLflow's JSON carries them ---------------------------------------------------
def metric_value(value: float | None, is_nan: bytes | None) -> float | str:
    """NaN (the sandbox's older rows store it as ``is_nan`` and no value) and infinities
    as protobuf's JSON strings, which every MLflow client parses."""
    if value is None or (is_nan is not None and any(bytes(is_nan))):
        return "NaN"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _key_values(rows: list[sa.Row]) -> list[dict[str, str]]:
    return [{"key": r.name, "value": r.value} for r in rows]


class View:
    """One project's MLflow API over one connection (one request's READ ONLY transaction).

    ``project`` is the URL's ``:id`` segment as it came, still URL-encoded (an id or a full
    path such as ``group%2Fsub%2Fproject``). ``lenient`` accepts the MLflow client's list
    ``order_by`` (its first entry), which GitLab refuses."""

    def __init__(self, conn: Connection, project: str, base_url: str, *, lenient: bool = False):
        self.conn = conn
        self.base_url = base_url
        self.lenient = lenient
        self.project_id = resolve_project(conn, project)
        source = reading_source(conn)
        if source is None:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST",
                           "This database has no experiments: ml_experiments and the toolkit's "
                           "archive of it are both absent")
        self.source = source
        self.experiments_relation, self.tags_relation = experiment_relations(source)

    def _rows(self, sql: str, params: dict[str, Any]) -> list[sa.Row]:
        return list(self.conn.execute(sa.text(sql), params))

    # -- experiments -------------------------------------------------------------------
    def _experiments(self, where: str, params: dict[str, Any], tail: str = "",
                     select: str = "") -> list[sa.Row]:
        view = experiments_view(self.conn, self.source, "x.project_id = :project")
        return self._rows(f"""
            SELECT e.*{select} FROM (
                SELECT v.*, u.updated_at FROM ({view}) v JOIN {self.experiments_relation} u ON u.id = v.id
            ) e WHERE e.project_id = :project AND {where} {tail}""",
            {"project": self.project_id, **params})

    def _find_experiment(self, iid: Any, name: Any) -> sa.Row:
        """``find_experiment!(iid, name)``: by iid when one is given (even an empty one),
        else by name when one is given; 404 when none matches."""
        if iid is not None and iid is not rails.ABSENT:
            number = rails.integer_cast(iid)
            found = [] if number is None else self._experiments("e.iid = :iid", {"iid": number})
        elif name is not None and name is not rails.ABSENT:
            text = str(name)
            found = self._experiments("e.name = :name", {"name": text}) if rails.storable(text) else []
        else:
            found = []
        if not found:
            raise resource_not_found()
        return found[0]

    def _experiment_documents(self, rows: list[sa.Row]) -> list[dict[str, Any]]:
        tags: dict[int, list[sa.Row]] = {row.id: [] for row in rows}
        if rows:
            for tag in self._rows(f"""SELECT t.experiment_id, t.name, t.value FROM {self.tags_relation} t
                                      WHERE t.experiment_id = ANY(:ids) ORDER BY t.experiment_id, t.id""",
                                  {"ids": list(tags)}):
                tags[tag.experiment_id].append(tag)
        return [{"experiment_id": str(row.iid), "name": row.name,
                 "lifecycle_stage": "deleted" if row.deleted_on is not None else "active",
                 "artifact_location": "not_implemented", "tags": _key_values(tags[row.id])}
                for row in rows]

    def get_experiment(self, params: dict[str, Any]) -> dict[str, Any]:
        """``optional :experiment_id, type: String, default: ''``: without one, no experiment."""
        iid = rails.grape_string(params, "experiment_id", default="")
        row = self._find_experiment(iid, params.get("experiment_name", rails.ABSENT))
        return {"experiment": self._experiment_documents([row])[0]}

    def get_experiment_by_name(self, params: dict[str, Any]) -> dict[str, Any]:
        """``optional :experiment_name, type: String, default: ''``; an ``experiment_id``
        in the request still wins, as in GitLab's shared ``experiment`` helper."""
        name = rails.grape_string(params, "experiment_name", default="")
        row = self._find_experiment(params.get("experiment_id", rails.ABSENT), name)
        return {"experiment": self._experiment_documents([row])[0]}

    def search_experiments(self, params: dict[str, Any], limit: int) -> dict[str, Any]:
        size = rails.page_size(params, 200, limit)
        ordering = experiment_ordering(order_text(params, "created_at DESC", lenient=self.lenient))
        token = rails.grape_string(params, "page_token")
        rows, next_token = self._experiment_page(ordering, size, token)
        return {"experiments": self._experiment_documents(rows), "next_page_token": next_token}

    def experiments_list_page(self, token: str | None, size: int) -> tuple[list[dict[str, Any]], str | None]:
        """experiments/list: every experiment in the finder's default order (``id DESC``),
        one page at a time so the server can stream them."""
        rows, next_token = self._experiment_page(EXPERIMENT_LIST, size, token)
        return self._experiment_documents(rows), next_token

    def _experiment_page(self, ordering: Ordering, size: int,
                         token: str | None) -> tuple[list[sa.Row], str | None]:
        keyed: dict[str, Any] = {"n": size + 1}
        where = ordering.after(token or None, keyed)
        rows = self._experiments(where, keyed, f"ORDER BY {ordering.order_by()} LIMIT :n",
                                 select=f", {ordering.select()}")
        return _paged(rows, size, ordering)

    # -- runs --------------------------------------------------------------------------
    RUN_COLUMNS = """c.id, c.eid, c.name, c.status, c.start_time, c.end_time, c.user_id,
        c.created_at, pk.project_id AS package_project, pk.name AS package_name,
        pk.version AS package_version"""

    def _run(self, params: dict[str, Any], *, with_experiment: bool = True) -> sa.Row:
        """``find_candidate!(params[:run_id])``: the candidate of the project whose eid is
        ``run_id`` (``run_uuid`` is ignored), with its experiment's iid."""
        given = rails.grape_string(params, "run_id", required=True)
        eid = rails.uuid_cast(given) if given else None
        if eid is None:
            raise resource_not_found()
        parent, iid = ((run_parent(self.conn, self.source), "x.iid") if with_experiment
                       else ("", "0"))
        found = self._rows(f"""
            SELECT {self._run_columns()}, {iid} AS experiment_iid FROM ml_candidates c {parent}
            LEFT JOIN packages_packages pk ON pk.id = c.package_id
            WHERE c.project_id = :project AND c.eid = CAST(:eid AS uuid)""",
            {"project": self.project_id, "eid": eid})
        if not found or found[0].experiment_iid is None:
            raise resource_not_found()
        return found[0]

    def get_run(self, params: dict[str, Any]) -> dict[str, Any]:
        run = self._run(params)
        return {"run": self._run_documents([run], str(run.experiment_iid))[0]}

    def search_runs(self, params: dict[str, Any], limit: int) -> dict[str, Any]:
        ids = rails.grape_array(params, "experiment_ids")
        first = ids[0] if ids else None
        if isinstance(first, (list, dict)):
            # GitLab hands it to ActiveRecord, which fails; its rescue answers this
            raise invalid_parameter("experiment_ids must hold experiment ids")
        size = rails.page_size(params, 200, limit)
        ordering = run_ordering(order_text(params, "created_at DESC", lenient=self.lenient))
        token = rails.grape_string(params, "page_token")
        experiment = self._find_experiment(first, params.get("experiment_name", rails.ABSENT))
        keyed: dict[str, Any] = {"n": size + 1, "experiment_row": experiment.id,
                                 "experiment_model": experiment.model_id}
        where = ordering.after(token or None, keyed)
        metric_join = ""
        if ordering.metric is not None and not rails.storable(ordering.metric):
            raise invalid_parameter("order_by names a metric no run can have (a NUL or a lone surrogate)")
        if ordering.metric is not None:
            # the run's latest value of the metric (Ml::CandidateMetric.latest); runs
            # without it are left out, as GitLab's INNER JOIN leaves them out
            keyed["metric"] = ordering.metric
            metric_join = """JOIN LATERAL (
                SELECT m.value FROM ml_candidate_metrics m WHERE m.candidate_id = c.id AND m.name = :metric
                ORDER BY m.id DESC LIMIT 1) lm ON true"""
        rows = self._rows(f"""
            SELECT {self._run_columns()}, {ordering.select()} FROM ml_candidates c {metric_join}
            LEFT JOIN packages_packages pk ON pk.id = c.package_id
            WHERE {runs_of_experiment(self.conn, self.source)} AND {where}
            ORDER BY {ordering.order_by()} LIMIT :n""", keyed)
        page, next_token = _paged(rows, size, ordering)
        return {"runs": self._run_documents(page, str(experiment.iid)), "next_page_token": next_token}

    def _run_columns(self) -> str:
        """The columns a run's answer needs, its ``artifact_uri`` path among them
        (:mod:`.artifact_uri`: generic package, model version, or ``candidate:<iid>``, at
        this stage), so a page of runs is one query."""
        experiments, _ = experiment_relations(self.source)
        return f"{self.RUN_COLUMNS}, {artifact_path_sql(self.conn, experiments)} AS artifact_path"

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
                "start_time": run.start_time or 0}
            if run.end_time is not None:
                info["end_time"] = run.end_time
            if run.name is not None:
                info["run_name"] = run.name
            info.update({
                "status": STATUS_NAMES.get(run.status, str(run.status)),
                "artifact_uri": artifact_uri(self.base_url, run.artifact_path), "lifecycle_stage": "active",
                "user_id": "" if run.user_id is None else str(run.user_id)})
            documents.append({"info": info, "data": data[run.id]})
        return documents

    def metric_history(self, params: dict[str, Any], limit: int) -> dict[str, Any]:
        """``for_history``: the points of one key, by ``step`` then ``tracked_at`` (NULLs
        last), then ``id DESC``. Both ``run_id`` and ``metric_key`` are required."""
        problems = [f"{name} is missing" for name in ("run_id", "metric_key") if name not in params]
        if problems:
            raise grape_errors(*problems)
        key = rails.grape_string(params, "metric_key", required=True)
        size = rails.page_size(params, MAX_PAGE, limit)
        token = rails.grape_string(params, "page_token")
        run = self._run(params, with_experiment=False)
        keyed: dict[str, Any] = {"c": run.id, "key": key or "", "n": size + 1}
        where = METRIC_HISTORY.after(token or None, keyed)
        rows = [] if key is None or not rails.storable(key) else self._rows(f"""
            SELECT m.id, m.name, m.value, m.is_nan, m.step, m.tracked_at, {METRIC_HISTORY.select()}
            FROM ml_candidate_metrics m
            WHERE m.candidate_id = :c AND m.name = :key AND {where}
            ORDER BY {METRIC_HISTORY.order_by()} LIMIT :n""", keyed)
        page, next_token = _paged(rows, size, METRIC_HISTORY)
        return {"metrics": [_metric(m.name, m.value, m.is_nan, m.step, m.tracked_at) for m in page],
                "next_page_token": next_token}


def reading_source(conn: Connection) -> str | None:
    """The fingerprint's source, but while milestone 4 is being rolled back the archive:
    it is whole until the rollback drops it, while the rebuilt tables are refilled in
    batches (a fingerprint is never taken in between; a client may read then)."""
    source = mlflow_source(conn)
    if (source == FROM_MODELS and relation_exists(conn, M4_ARCHIVE_EXPERIMENTS)
            and milestone_state(conn, M4)["state"] == MilestoneState.ROLLING_BACK):
        return FROM_MODELS_AND_ARCHIVE
    return source


def _paged(rows: list[sa.Row], size: int, ordering: Ordering) -> tuple[list[sa.Row], str | None]:
    """The page and, when a row beyond it was read, the token of its last row."""
    if len(rows) <= size:
        return rows, None
    return rows[:size], ordering.token_for(rows[size - 1])


def _metric(name: str, value: float | None, is_nan: bytes | None, step: int | None,
            tracked_at: int | None) -> dict[str, Any]:
    """GitLab's Metric entity: ``timestamp`` always (null when none was logged), ``step``
    only when there is one."""
    found: dict[str, Any] = {"key": name, "value": metric_value(value, is_nan), "timestamp": tracked_at}
    if step is not None:
        found["step"] = step
    return found
