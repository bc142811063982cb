"""A request's parameters read as GitLab reads them, before any endpoint sees them.

Two of GitLab's Rack middlewares stand between the socket and an MLflow endpoint, each
answering bad input with a 400 of its own shape; this module is those two, so that no
string reaches :class:`toolkit.mlflow_api.views.View` that PostgreSQL or Python could not
take:

1. ``Gitlab::Middleware::HandleMalformedStrings`` (``lib/gitlab/middleware/
   handle_malformed_strings.rb``, Rack): a path, query or JSON parameter with a NUL or
   invalid UTF-8, an ``Authorization`` header with either, or a body Rails cannot parse as
   JSON is answered ``400``, ``Content-Type: text/plain``, body ``Bad Request``
   (:class:`Malformed`). GitLab looks two levels deep for NULs; this looks everywhere, so
   no NUL ever reaches PostgreSQL (which refuses it in text).
2. ``Gitlab::Middleware::JsonValidation`` (``lib/gitlab/middleware/json_validation.rb``,
   limits in ``lib/gitlab/json/stream_validator.rb``): JSON deeper than 32, an array or
   object over 50,000 entries, over 100,000 elements in all: ``400 {"error": "Parameters
   nested too deeply"}`` and its siblings (:class:`Refused`).

Grape's declared parameter types (``400 {"error": "<name> is invalid"}``), presence and
the meaning of a value are the endpoints' (:mod:`toolkit.mlflow_api.rails`,
:mod:`toolkit.mlflow_api.views`).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

# The parameters GitLab declares for the read endpoints (with their Grape types), from
# lib/api/ml/mlflow/{experiments,runs,metrics,registered_models,model_versions}.rb: the
# names an access log line shows (never a value). An endpoint added to ``Api.reads`` adds
# its line here.
DECLARED: dict[str, dict[str, type]] = {
    "experiments/get": {"experiment_id": str},
    "experiments/get-by-name": {"experiment_name": str},
    "experiments/search": {"max_results": int, "page_token": str, "filter": str},
    "runs/get": {"run_id": str, "run_uuid": str},
    "runs/search": {"experiment_ids": list, "max_results": int, "page_token": str},
    "metrics/get-history": {"run_id": str, "metric_key": str, "max_results": int, "page_token": str},
    "registered-models/get": {"name": str},
    "registered-models/get-latest-versions": {"name": str},
    "registered-models/search": {"filter": str, "max_results": int, "page_token": str},
    "registered-models/alias": {"name": str, "alias": str},
    "model-versions/get": {"name": str, "version": str},
    "model-versions/get-download-uri": {"name": str, "version": int},
}
# Any other name is shown as ``*``.
KNOWN_NAMES = frozenset(name for names in DECLARED.values() for name in names) | {"order_by"}

# lib/gitlab/middleware/json_validation.rb DEFAULT_LIMITS, and the messages of
# Gitlab::Json::StreamValidator.user_facing_error_message.
MAX_DEPTH, MAX_ARRAY, MAX_HASH, MAX_ELEMENTS = 32, 50_000, 50_000, 100_000
TOO_DEEP = "Parameters nested too deeply"
MAX_QUERY_FIELDS = 1000


class Malformed(Exception):
    """GitLab's HandleMalformedStrings answer: 400, text/plain, ``Bad Request``."""


class Refused(Exception):
    """A 400 GitLab answers as ``{"error": message}`` (Grape, JsonValidation)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status

    def document(self) -> dict[str, str]:
        return {"error": self.message}


def text(raw: str, what: str = "") -> str:
    """A WSGI string (bytes as latin-1) read as UTF-8; NUL or invalid UTF-8 is Malformed."""
    try:
        decoded = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise Malformed(what) from None
    if "\x00" in decoded:
        raise Malformed(what)
    return decoded


def query_params(raw: str) -> dict[str, Any]:
    """A query string (or a form body) as Rack reads it: ``name=v`` (the last one wins),
    ``name[]=v`` a list, ``name[key]=v`` a hash."""
    fields = [field for field in raw.encode("latin-1").split(b"&") if field]
    if len(fields) > MAX_QUERY_FIELDS:
        raise Refused("Too many total parameters")
    try:
        decoded = [tuple(unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8")
                         for part in (*field.split(b"=", 1), b"")[:2]) for field in fields]
    except UnicodeError:
        raise Malformed("query") from None
    params: dict[str, Any] = {}
    for key, value in decoded:
        if "\x00" in key or "\x00" in value:
            raise Malformed("query")
        if key.endswith("[]"):
            found = params.setdefault(key[:-2], [])
            if isinstance(found, list):
                found.append(value)
            continue
        nested = re.fullmatch(r"([^\[\]]+)\[([^\[\]]+)\]", key)
        if nested:
            found = params.setdefault(nested[1], {})
            if isinstance(found, dict):
                found[nested[2]] = value
            continue
        params[key] = value
    return params


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's extension, not JSON


def json_body(raw: bytes) -> Any:
    """The body as JSON, held to JsonValidation's limits. An empty body is ``{}``."""
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise Refused(TOO_DEEP) from None
    except ValueError:  # not UTF-8, not JSON, an integer of more digits than Python reads
        raise Malformed("body") from None
    _within_limits(document)
    return document


def _within_limits(document: Any) -> None:
    """Depth, sizes and element count as ``Gitlab::Json::StreamValidator`` counts them
    (a key and its pair count two elements), and no NUL or lone surrogate anywhere."""
    elements = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth + 1 > MAX_DEPTH:
                raise Refused(TOO_DEEP)
            if len(value) > MAX_HASH:
                raise Refused("Hash parameter too large")
            elements += 2 * len(value)
            for key, item in value.items():
                _clean_string(key)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth + 1 > MAX_DEPTH:
                raise Refused(TOO_DEEP)
            if len(value) > MAX_ARRAY:
                raise Refused("Array parameter too large")
            elements += len(value)
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _clean_string(value)
        if elements > MAX_ELEMENTS:
            raise Refused("Too many total parameters")


def _clean_string(value: str) -> None:
    if "\x00" in value:
        raise Malformed("NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800": a lone surrogate is no UTF-8 string
        raise Malformed("surrogate") from None
