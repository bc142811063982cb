"""GitLab's model-registry reads, answered as GitLab answers them.

Each answer follows GitLab's own code (commits named in ``docs/mlflow.md``, section
"Registry and artifacts"):

* routes and parameters: ``lib/api/ml/mlflow/registered_models.rb`` (get, get-latest-versions,
  search, alias) and ``lib/api/ml/mlflow/model_versions.rb`` (get, get-download-uri);
* errors: ``lib/api/ml/mlflow/api_helpers.rb`` — ``resource_not_found!`` is 404
  ``{"error_code": "RESOURCE_DOES_NOT_EXIST"}`` with no message, ``invalid_parameter!`` is
  400 ``{"error_code": "INVALID_PARAMETER_VALUE", "message": …}``; a parameter declared with
  ``requires`` and missing is Grape's own 400 ``{"error": "name is missing"}``;
* documents: ``lib/api/entities/ml/mlflow/registered_model.rb`` and ``model_version.rb``:
  timestamps in whole seconds (``created_at.to_i``), a version's ``version`` is its row id,
  its ``aliases`` its semantic version, ``user_id`` null, ``current_stage`` "development";
* search: ``model_filter_params`` / ``model_order_params`` and ``Projects::Ml::ModelFinder``
  (``name LIKE '%…%'``, ``Sortable``'s orders, ties ``id DESC``, keyset pages).

Where GitLab's answer is a defect a client meets, the answer is still GitLab's and says so:
Current MLflow clients (2.22, 3.x) append ``tag.`mlflow.prompt.is_prompt` != 'true'`` to every
registered-model search, which GitLab's filter parser refuses (400) or reads as part of the
name (no match); get-latest-versions of a model without versions is ``[null]``, which the
MLflow client cannot parse.

A registered model's ``latest_versions`` are all its versions as ModelVersion entities: the
newest ``registered_model.rb`` the index holds exposes ``versions`` ``using:
::API::Entities::Ml::Mlflow::ModelVersion``; the one at bc7f4d7d (an older state) exposed the
association with no entity, which wrote raw rows whose integer ``model_id`` MLflow 3
clients cannot parse (see docs/mlflow.md).
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from toolkit.catalog import relation_exists
from toolkit.mlflow_api import rails
from toolkit.mlflow_api.errors import ApiError, grape_errors, invalid_parameter, resource_not_found
from toolkit.mlflow_api.views import View

PROMPT_TAG = "mlflow.prompt.is_prompt"
SEARCH_DEFAULT, SEARCH_MAX = 200, 1000  # registered_models.rb: max_results default 200, capped at 1000
# api_helpers.rb: OUTER_QUOTES_REGEXP = /^("|')|("|')?$/ (Ruby's ^ and $ are line anchors)
OUTER_QUOTES = re.compile(r"^(\"|')|(\"|')?$", re.MULTILINE)
# Sortable.simple_sorts: the "#{order_by}_#{sort}" values it knows; any other is no order
# at all, and ModelFinder's with_order_id_desc is then the only one.
SORTS: dict[str, tuple[str, str]] = {
    "created_at_asc": ("m.created_at", "ASC"), "created_at_desc": ("m.created_at", "DESC"),
    "id_asc": ("m.id", "ASC"), "id_desc": ("m.id", "DESC"),
    "name_asc": ("lower(m.name)", "ASC"), "name_desc": ("lower(m.name)", "DESC"),
    "updated_at_asc": ("m.updated_at", "ASC"), "updated_at_desc": ("m.updated_at", "DESC"),
}
SORT_CASTS = {"m.created_at": "timestamptz", "m.updated_at": "timestamptz", "m.id": "bigint",
              "lower(m.name)": "text"}
# ModelFinder: VALID_ORDER_BY, VALID_SORT and their defaults
VALID_ORDER_BY, VALID_SORT = ("name", "created_at", "updated_at", "id"), ("asc", "desc")


def grape_missing(params: dict[str, Any], *names: str) -> None:
    """Grape's ``requires``: every missing name, in declaration order, in one 400."""
    missing = [f"{name} is missing" for name in names if params.get(name) is None]
    if missing:
        raise grape_errors(*missing)


def ruby_to_i(text: str) -> int | None:
    """How ActiveRecord reads an id given as text (``"12"``, ``" 12abc"`` -> 12); None
    where it finds no number, which no row has."""
    found = re.match(r"\s*([+-]?)0*(\d+)", text, re.ASCII)
    if not found or len(found.group(2)) > 19:  # beyond any bigint (and Python's int() digit limit)
        return None
    number = int(found.group(1) + found.group(2))
    return number if abs(number) < 2**63 else None


def grape_integer(params: dict[str, Any], name: str) -> int:
    """Grape's ``type: Integer`` coercion: base-10 digits (underscores between them, space
    around), else 400 ``"<name> is invalid"``."""
    raw = params.get(name)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ApiError(400, body={"error": f"{name} is invalid"})
    if isinstance(raw, int):
        return raw
    digits = raw.strip().replace("_", "")
    if not re.fullmatch(r"\s*[+-]?\d+(?:_\d+)*\s*", raw, re.ASCII) or len(digits.lstrip("+-0")) > 19:
        # beyond a bigint no id exists; Grape would take it, the toolkit answers 400 (docs/mlflow.md)
        raise ApiError(400, body={"error": f"{name} is invalid"})
    return int(digits)


def _seconds(at: datetime) -> int:
    """Ruby's ``Time#to_i``: whole seconds, rounded down."""
    return math.floor(at.timestamp())


def _present(value: Any) -> bool:
    """Rails' ``present?`` for a string: not nil, not only whitespace."""
    return value is not None and str(value).strip() != ""


def project_path(conn: sa.Connection, project_id: int) -> str:
    """The project's full path, as GitLab's routes give it; the sandbox has no ``routes``
    table, and its projects are named by their path."""
    if relation_exists(conn, "routes"):
        path = conn.execute(sa.text("SELECT path FROM routes WHERE source_type = 'Project' "
                                    "AND source_id = :p"), {"p": project_id}).scalar()
        if path:
            return str(path)
    return str(conn.execute(sa.text("SELECT name FROM projects WHERE id = :p"),
                            {"p": project_id}).scalar_one())


def model_version_source(base_url: str, path: str, model_id: int, version_id: int) -> str:
    """model_version.rb ``source``: ``expose_url(project_ml_model_version_path(project,
    model, version))``, the version's page in GitLab."""
    return f"{base_url}/{path}/-/ml/models/{model_id}/versions/{version_id}"


def download_uri(version: int) -> str:
    """get_download.rb: ``"mlflow-artifacts:/#{version}"``, the version's id as given (the
    client turns it into ``<tracking URI>/api/2.0/mlflow-artifacts/artifacts/<id>``).
    A run's ``artifact_uri`` follows another rule (``run_info.rb``); both name a model
    version by its id."""
    return f"mlflow-artifacts:/{version}"


@dataclass(frozen=True)
class Sort:
    key: str  # a Sortable name ("name_asc"), or "" for none (id DESC only)

    @property
    def expression(self) -> tuple[str, str] | None:
        return SORTS.get(self.key)


def model_sort(order_by: Any) -> Sort:
    """api_helpers.rb ``model_order_params`` then ModelFinder#ordered."""
    if isinstance(order_by, list):  # a repeated query parameter: Rack keeps the last
        order_by = order_by[-1] if order_by else None
    if not _present(order_by):
        column, sort = "name", "asc"
    else:
        words = str(order_by).lower().split()
        column = "updated_at" if words and words[0] == "last_updated_timestamp" else (words or [""])[0]
        sort = words[1] if len(words) > 1 else "asc"
    column = column if column in VALID_ORDER_BY else "created_at"
    sort = sort if sort in VALID_SORT else "desc"
    key = f"{column}_{sort}"
    return Sort(key if key in SORTS else "")


def name_filter(raw: Any) -> tuple[bool, str | None]:
    """api_helpers.rb ``model_filter_params``: (whether the filter names ``name``, the
    name). Ruby's ``split('=')`` keeps leading empty fields and drops trailing ones."""
    if not _present(raw):
        return False, None
    fields = str(raw).split("=")
    while fields and fields[-1] == "":
        fields.pop()
    param = fields[0] if fields else None
    value = fields[1] if len(fields) > 1 else None
    if param != "name":
        return False, None
    if _present(value):
        value = OUTER_QUOTES.sub("", value or "")
    return True, value


def _like(text: str) -> str:
    """ActiveRecord's ``sanitize_sql_like``: ``\\``, ``%`` and ``_`` escaped."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def _token(sort: Sort, value: Any, row_id: int) -> str:
    raw = json.dumps({"s": sort.key, "k": [value, row_id]}, separators=(",", ":"), default=str)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _check_sort_value(value: Any, cast: str | None) -> None:
    """A token's sort value must be what the sort compares (a forged one is a 400, never a
    value PostgreSQL or the driver refuses); raises ValueError otherwise."""
    if cast is None:
        return
    if cast == "bigint":
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
            raise ValueError
        return
    if not isinstance(value, str) or not rails.storable(value):
        raise ValueError
    if cast == "timestamptz":
        datetime.fromisoformat(value)


def _untoken(token: Any, sort: Sort) -> tuple[Any, int] | None:
    if token in (None, ""):
        return None
    try:
        text = str(token)
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        value, row_id = data["k"]
        if (data["s"] != sort.key or not isinstance(row_id, int) or isinstance(row_id, bool)
                or abs(row_id) >= 2**63):
            raise ValueError
        _check_sort_value(value, SORT_CASTS.get((sort.expression or ("", ""))[0]))
    except (ValueError, KeyError, TypeError):
        raise invalid_parameter(f"page_token {str(token)[:80]!r} is not a token this server gave for "
                                "this order_by") from None
    return value, row_id


class Registry:
    """One project's registry reads over a View's connection (one READ ONLY transaction)."""

    VERSION_COLUMNS = """v.id, v.created_at, v.updated_at, v.project_id, v.model_id, v.package_id,
        v.version, v.description, v.semver_major, v.semver_minor, v.semver_patch,
        v.semver_prerelease"""

    def __init__(self, view: View):
        self.view = view
        self.conn = view.conn
        self.project_id = view.project_id
        self.base_url = view.base_url

    def _rows(self, sql: str, **params: Any) -> list[sa.Row]:
        return list(self.conn.execute(sa.text(sql), params))

    # -- finding ------------------------------------------------------------------------
    def _model(self, name: Any) -> sa.Row:
        """``find_model``: Ml::FindModelService by name; no name (nil) finds nothing."""
        if name is None:
            raise resource_not_found()
        found = self._rows("""SELECT id, name, created_at, updated_at, description, user_id FROM ml_models
                              WHERE project_id = :p AND name = :n""", p=self.project_id, n=str(name))
        if not found:
            raise resource_not_found()
        return found[0]

    def _version(self, name: Any, version: Any) -> sa.Row:
        """``find_model_version``: ModelVersion.by_project_id_name_and_version, the version
        being the semantic version text (``1.0.0``), not the id."""
        if name is None or version is None:
            raise resource_not_found()
        found = self._rows(f"""
            SELECT {self.VERSION_COLUMNS}, m.name AS model_name, c.eid
            FROM ml_model_versions v JOIN ml_models m ON m.id = v.model_id
            LEFT JOIN ml_candidates c ON c.model_version_id = v.id
            WHERE v.project_id = :p AND m.project_id = :p AND m.name = :n AND v.version = :v""",
            p=self.project_id, n=str(name), v=str(version))
        if not found:
            raise resource_not_found()
        return found[0]

    # -- documents ----------------------------------------------------------------------
    def _version_documents(self, versions: list[sa.Row]) -> list[dict[str, Any]]:
        """model_version.rb, field for field and in its order."""
        tags = self._tags("ml_model_version_metadata", "model_version_id", [v.id for v in versions])
        path = project_path(self.conn, self.project_id) if versions else ""
        documents = []
        for v in versions:
            if v.eid is None:  # ``object.candidate.eid`` on nil
                raise ApiError(500, body={
                    "message": f"500 Internal Server Error: GitLab fails here too: model version {v.id} "
                               "has no run, and GitLab's entity reads its run's eid (see docs/mlflow.md)"})
            documents.append({
                "name": v.model_name, "version": str(v.id),
                "creation_timestamp": _seconds(v.created_at),
                "last_updated_timestamp": _seconds(v.updated_at),
                "user_id": None, "current_stage": "development", "description": v.description or "",
                "source": model_version_source(self.base_url, path, v.model_id, v.id),
                "run_id": str(v.eid), "status": "READY", "status_message": "",
                "tags": tags[v.id], "run_link": "", "aliases": [v.version]})
        return documents

    def _tags(self, table: str, key: str, ids: list[int]) -> dict[int, list[dict[str, str]]]:
        """KeyValue entities of ``metadata`` (an unordered has_many: in id order here)."""
        found: dict[int, list[dict[str, str]]] = {i: [] for i in ids}
        if ids:
            for row in self._rows(f"SELECT {key} AS owner, name, value FROM {table} "
                                  f"WHERE {key} = ANY(:ids) ORDER BY id", ids=ids):
                found[row.owner].append({"key": row.name, "value": row.value})
        return found

    def _model_documents(self, models: list[sa.Row]) -> list[dict[str, Any]]:
        """registered_model.rb: ``latest_versions`` is every version (``has_many
        :versions``, unordered: id order here) as a ModelVersion entity."""
        ids = [m.id for m in models]
        tags = self._tags("ml_model_metadata", "model_id", ids)
        versions: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        if ids:
            rows = self._rows(f"""
                SELECT {self.VERSION_COLUMNS}, m.name AS model_name, c.eid
                FROM ml_model_versions v JOIN ml_models m ON m.id = v.model_id
                LEFT JOIN ml_candidates c ON c.model_version_id = v.id
                WHERE v.model_id = ANY(:ids) ORDER BY v.id""", ids=ids)
            for row, document in zip(rows, self._version_documents(rows), strict=True):
                versions[row.model_id].append(document)
        return [{
            "name": m.name, "creation_timestamp": _seconds(m.created_at),
            "last_updated_timestamp": _seconds(m.updated_at), "description": m.description or "",
            "user_id": "" if m.user_id is None else str(m.user_id), "tags": tags[m.id],
            "latest_versions": versions[m.id]} for m in models]

    # -- endpoints ----------------------------------------------------------------------
    def registered_model(self, params: dict[str, Any]) -> dict[str, Any]:
        """GET registered-models/get (``name`` optional, default '')."""
        model = self._model(params.get("name", ""))
        return {"registered_model": self._model_documents([model])[0]}

    def latest_versions(self, params: dict[str, Any]) -> dict[str, Any]:
        """POST registered-models/get-latest-versions: ``[model.latest_version]`` whatever
        ``stages`` asks (GitLab declares no ``stages``; every version is "development").
        ``latest_version`` is ``latest_by_model``: highest semver_major, minor, patch
        (PostgreSQL's DESC puts NULLs first; ties fall to the id here, to PostgreSQL's plan
        on GitLab); a model without versions gives ``[null]``."""
        model = self._model(params.get("name"))
        latest = self._rows(f"""
            SELECT {self.VERSION_COLUMNS}, CAST(:name AS text) AS model_name, c.eid
            FROM ml_model_versions v LEFT JOIN ml_candidates c ON c.model_version_id = v.id
            WHERE v.model_id = :m
            ORDER BY v.semver_major DESC, v.semver_minor DESC, v.semver_patch DESC, v.id DESC
            LIMIT 1""", m=model.id, name=model.name)
        return {"model_versions": self._version_documents(latest) if latest else [None]}

    def version_by_alias(self, params: dict[str, Any]) -> dict[str, Any]:
        """GET registered-models/alias: the alias is the semantic version."""
        found = self._version(params.get("name"), params.get("alias"))
        return {"model_version": self._version_documents([found])[0]}

    def model_version(self, params: dict[str, Any]) -> dict[str, Any]:
        """GET model-versions/get (``name`` and ``version`` required)."""
        grape_missing(params, "name", "version")
        found = self._version(params["name"], params["version"])
        return {"model_version": self._version_documents([found])[0]}

    def download_uri(self, params: dict[str, Any]) -> dict[str, Any]:
        """GET model-versions/get-download-uri: GitLab answers from the parameters alone,
        whether or not such a version exists."""
        grape_missing(params, "name", "version")
        return {"artifact_uri": download_uri(grape_integer(params, "version"))}

    def search(self, params: dict[str, Any], limit: int) -> dict[str, Any]:
        """GET registered-models/search."""
        size = SEARCH_DEFAULT
        if params.get("max_results") not in (None, ""):
            size = grape_integer(params, "max_results")
        size = min(size, SEARCH_MAX, limit)
        if size < 1:
            raise invalid_parameter(f"max_results must be at least 1, not {size}")
        raw_filter = params.get("filter")
        by_name, name = name_filter(raw_filter)
        if raw_filter is not None and not by_name:
            message = "Invalid attribute key specified. Valid keys are '{'name'}'"
            if PROMPT_TAG in str(raw_filter):
                message += (f" (GitLab answers this too: current MLflow clients (2.22, 3.x) add "
                            f"\"tag.`{PROMPT_TAG}` != 'true'\" to every registered-model search, "
                            "and GitLab's filter takes only name='...'; see docs/mlflow.md)")
            raise invalid_parameter(message)
        sort = model_sort(params.get("order_by"))
        query: dict[str, Any] = {"p": self.project_id, "n": size + 1}
        where = ["m.project_id = :p"]
        if _present(name):
            where.append("m.name LIKE :like")
            query["like"] = _like(str(name))
        expression = sort.expression
        after = _untoken(params.get("page_token"), sort)
        if expression is None or expression[0] == "m.id":
            descending = expression is None or expression[1] == "DESC"
            ordering = f"m.id {'DESC' if descending else 'ASC'}"
            if after is not None:
                where.append(f"m.id {'<' if descending else '>'} :k_id")
                query["k_id"] = after[1]
        else:
            column, direction = expression
            ordering = f"{column} {direction}, m.id DESC"
            if after is not None:
                where.append(f"({column} {'>' if direction == 'ASC' else '<'} CAST(:k_value AS "
                             f"{SORT_CASTS[column]}) OR ({column} = CAST(:k_value AS {SORT_CASTS[column]}) "
                             "AND m.id < :k_id))")
                query["k_value"], query["k_id"] = after
        rows = self._rows(f"""
            SELECT m.id, m.name, lower(m.name) AS sort_name, m.created_at, m.updated_at, m.description,
                   m.user_id
            FROM ml_models m WHERE {' AND '.join(where)} ORDER BY {ordering} LIMIT :n""", **query)
        token = None
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            value = {"m.created_at": last.created_at, "m.updated_at": last.updated_at,
                     "lower(m.name)": last.sort_name}.get(expression[0] if expression else "")
            token = _token(sort, value.isoformat() if isinstance(value, datetime) else value, last.id)
        return {"registered_models": self._model_documents(rows), "next_page_token": token}
