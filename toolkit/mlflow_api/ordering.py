"""GitLab's order for experiments/search, runs/search and metric history, and its keyset
pages.

What GitLab does, read from its source:

* experiments/search: ``model_order_params`` (``api_helpers.rb``) lower-cases
  ``order_by``, splits it on spaces, maps ``last_updated_timestamp`` to ``updated_at`` and
  defaults the direction to ``asc``; ``ExperimentFinder`` keeps ``name``, ``created_at``,
  ``updated_at``, ``id`` (else ``id``) and ``asc``/``desc`` (else ``desc``), and orders by
  ``Sortable`` (``name`` is ``lower(name)``) then ``id DESC``. The parameter's default is
  ``created_at DESC``; a blank one is ``name asc``.
* runs/search: ``candidates_order_params`` splits ``order_by`` on spaces and the first word
  on dots: one part is a column, ``metrics.<key>`` a metric, anything else nothing;
  ``CandidateFinder`` keeps ``name``, ``created_at``, ``id`` (else ``created_at``) and
  ``asc``/``desc`` (else ``desc``: no default direction here), then ``id DESC``. A metric
  orders by each run's latest value of it (runs without it are left out), NULLs last,
  then ``id DESC``.
* metric history: ``CandidateMetric.for_history`` orders by ``step``, ``tracked_at``, and
  the keyset adds ``id DESC``; both columns are nullable and ascending, so their NULLs
  come last (``SimpleOrderBuilder#nullability``).
* ``order_by`` is declared ``type: String``: the list the MLflow client sends is refused
  with ``order_by is invalid`` (mlflow/mlflow#13082).

Keyset pages follow GitLab's ``keyset_paginate``: the token holds the last row's sort
values, so a page costs the same wherever it is. Tokens are the toolkit's own, opaque to
the client, and checked before use.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from toolkit.mlflow_api.errors import invalid, invalid_parameter
from toolkit.mlflow_api.rails import BIGINT_MAX, BIGINT_MIN, awk_split, blank, dot_split, storable

LIST_ORDER_DEFECT = (" (GitLab reads order_by as one string; MLflow clients send a list, "
                     "mlflow/mlflow#13082. `toolkit mlflow serve --lenient` reads the first entry)")


@dataclass(frozen=True)
class Key:
    """One ORDER BY term. ``nullable`` keys put their NULLs where ``nulls_first`` says."""

    sql: str
    cast: str
    descending: bool
    nullable: bool = False
    nulls_first: bool = False

    @property
    def text(self) -> str:
        nulls = (" NULLS FIRST" if self.nulls_first else " NULLS LAST") if self.nullable else ""
        return f"{self.sql} {'DESC' if self.descending else 'ASC'}{nulls}"


@dataclass(frozen=True)
class Ordering:
    """A whole keyset order: its terms (the last one unique) and what it is, for tokens."""

    name: str
    keys: tuple[Key, ...]
    metric: str | None = None  # runs/search by metrics.<key>

    def order_by(self) -> str:
        return ", ".join(key.text for key in self.keys)

    def select(self) -> str:
        return ", ".join(f"{key.sql} AS k{i}" for i, key in enumerate(self.keys))

    def after(self, token: str | None, params: dict[str, Any]) -> str:
        """The condition for the rows after the token's row (``true`` without a token)."""
        if token is None:
            return "true"
        values = decode_token(token, self)
        alternatives = []
        for i, key in enumerate(self.keys):
            terms = []
            for j in range(i):
                if values[j] is None:
                    terms.append(f"{self.keys[j].sql} IS NULL")
                else:
                    params[f"k{j}"] = values[j]
                    terms.append(f"{self.keys[j].sql} = CAST(:k{j} AS {self.keys[j].cast})")
            if values[i] is None:
                if not key.nulls_first:
                    continue  # NULLs come last: nothing follows them in this term
                terms.append(f"{key.sql} IS NOT NULL")
            else:
                params[f"k{i}"] = values[i]
                term = f"{key.sql} {'<' if key.descending else '>'} CAST(:k{i} AS {key.cast})"
                if key.nullable and not key.nulls_first:
                    term = f"({term} OR {key.sql} IS NULL)"
                terms.append(term)
            alternatives.append(" AND ".join(terms))
        return "(" + " OR ".join(f"({a})" for a in alternatives) + ")" if alternatives else "false"

    def token_for(self, row: Any) -> str:
        values = [_json_value(getattr(row, f"k{i}")) for i in range(len(self.keys))]
        raw = json.dumps({"o": self.name, "k": values}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def decode_token(token: str, ordering: Ordering) -> list[Any]:
    """The token's sort values, each checked against its term's type; anything else is
    400 (GitLab fails with 500 on a token it cannot decode, and answers 400
    ``INVALID_PARAMETER_VALUE`` when the database refuses the values)."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        values = data["k"]
        if data["o"] != ordering.name or not isinstance(values, list) \
                or len(values) != len(ordering.keys):
            raise ValueError
        for value, key in zip(values, ordering.keys, strict=True):
            _check(value, key)
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise invalid_parameter(f"page_token {token[:80]!r} is not a token this server gave "
                                "for this order_by") from None
    return values


def _check(value: Any, key: Key) -> None:
    if value is None:
        if not key.nullable:
            raise ValueError
    elif key.cast == "bigint" or key.cast == "integer":
        if isinstance(value, bool) or not isinstance(value, int) or not BIGINT_MIN <= value <= BIGINT_MAX:
            raise ValueError
    elif key.cast == "double precision":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
    elif key.cast == "timestamptz":
        if not isinstance(value, str):
            raise ValueError
        datetime.fromisoformat(value)
    elif not isinstance(value, str) or not storable(value):
        raise ValueError


def order_text(params: dict[str, Any], default: str, *, lenient: bool) -> str:
    """``order_by`` as GitLab's Grape declaration gives it to the helpers: the default
    when absent or null, the text when a string, ``order_by is invalid`` when a list
    (``--lenient``: its first entry) or an object."""
    if "order_by" not in params or params["order_by"] is None:
        return default
    raw = params["order_by"]
    if isinstance(raw, list) and lenient:
        if not raw:
            return default
        raw = raw[0]
    if isinstance(raw, list):
        raise invalid("order_by", LIST_ORDER_DEFECT)
    if isinstance(raw, dict):
        raise invalid("order_by")
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw)


def _id(alias: str, descending: bool = True) -> Key:
    return Key(f"{alias}.id", "bigint", descending)


def experiment_ordering(text: str) -> Ordering:
    """experiments/search (``model_order_params`` then ``ExperimentFinder``)."""
    if blank(text):
        column, sort = "name", "asc"
    else:
        words = awk_split(text.lower())
        column = words[0] if words else ""
        sort = words[1] if len(words) > 1 else "asc"
        if column == "last_updated_timestamp":
            column = "updated_at"
    if column not in ("name", "created_at", "updated_at", "id"):
        column = "id"
    descending = sort != "asc" if sort in ("asc", "desc") else True
    if column == "id":
        keys: tuple[Key, ...] = (_id("e", descending),)
    else:
        sql, cast = {"name": ("lower(e.name)", "text"), "created_at": ("e.created_at", "timestamptz"),
                     "updated_at": ("e.updated_at", "timestamptz")}[column]
        keys = (Key(sql, cast, descending), _id("e"))
    return Ordering(f"experiments:{column}:{'desc' if descending else 'asc'}", keys)


EXPERIMENT_LIST = Ordering("experiments:id:desc", (_id("e"),))  # experiments/list: the finder's default


def run_ordering(text: str) -> Ordering:
    """runs/search (``candidates_order_params`` then ``CandidateFinder``)."""
    column: str | None = None
    kind: str | None = None
    sort: str | None = None
    if not blank(text):
        words = awk_split(text)
        parts = dot_split(words[0])
        if len(parts) == 1:
            column, kind = parts[0], "column"
        elif parts and parts[0] == "metrics":
            column, kind = parts[1], "metric"
        sort = words[1] if len(words) > 1 else None
    sort = sort.lower() if sort is not None else None
    descending = sort != "asc" if sort in ("asc", "desc") else True
    direction = "desc" if descending else "asc"
    if kind == "metric":
        metric = column or ""
        keys: tuple[Key, ...] = (Key("lm.value", "double precision", descending, nullable=True), _id("c"))
        return Ordering(f"runs:metric:{direction}:{metric}", keys, metric=metric)
    if column not in ("name", "created_at", "id"):
        column = "created_at"
    if column == "id":
        keys = (_id("c", descending),)
    elif column == "name":
        # a nullable column: SimpleOrderBuilder puts NULLs last ascending, first descending
        keys = (Key("lower(c.name)", "text", descending, nullable=True, nulls_first=descending), _id("c"))
    else:
        keys = (Key("c.created_at", "timestamptz", descending), _id("c"))
    return Ordering(f"runs:{column}:{direction}", keys)


METRIC_HISTORY = Ordering("history", (
    Key("m.step", "integer", False, nullable=True),
    Key("m.tracked_at", "bigint", False, nullable=True),
    _id("m"),
))
