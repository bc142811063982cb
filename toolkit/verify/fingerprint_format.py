"""What a fingerprint file must hold, checked field by field before it is used.

:meth:`Fingerprint.loads` checks the format number and the field names; the comparison
then reads every digest as ``{"rows": int, "hash": str}``, sends the watermarks and bucket
sizes to PostgreSQL as bigints and reads bucket keys as integers. A file edited by hand,
truncated or written by something else (``"tables": "x"``, ``{"rows": "abc", "hash": null}``)
would fail deep inside that work; :func:`check` names the first field that is wrong, so
``--compare`` refuses the file in one line before anything connects.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from toolkit.verify.digest import METHODS
from toolkit.verify.fingerprint import Fingerprint

BIGINT_MAX = 2**63 - 1
# The fields are the dataclass's own, so a field added to it is known here at once (and
# checked for its type once a rule below names it).
FIELDS = {f.name for f in fields(Fingerprint)}
REQUIRED = tuple(f.name for f in fields(Fingerprint)
                 if f.default is MISSING and f.default_factory is MISSING)
SCOPE_FIELDS = {"tables", "kept", "parts", "first_run"}
SCOPE_OPTIONAL = {"part_rows", "named", "named_parts"}  # absent from baselines taken before them


class FormatProblem(ValueError):
    """The first thing wrong with a fingerprint's contents, said with the field's path."""


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _count(value: object, where: str, *, low: int = 0) -> None:
    """A whole number that PostgreSQL can take as a bigint."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatProblem(f"{where} is {_shown(value)} ({_kind(value)}), not a whole number")
    if not low <= value <= BIGINT_MAX:
        raise FormatProblem(f"{where} is {value}, out of range {low}..{BIGINT_MAX}")


def _text(value: object, where: str, *, empty: bool = False) -> None:
    if not isinstance(value, str) or (not empty and not value):
        raise FormatProblem(f"{where} is {_shown(value)} ({_kind(value)}), not a non-empty string")


def _object(value: object, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatProblem(f"{where} is {_kind(value)}, not an object of {what}")
    return value


def _digest(value: object, where: str) -> None:
    """``{"rows": N, "hash": "…"}``, with ``bucket_size`` and ``buckets`` where a part or a
    table is kept per bucket of keys."""
    digest = _object(value, where, "rows and hash")
    for key in ("rows", "hash"):
        if key not in digest:
            raise FormatProblem(f"{where} has no {key!r}")
    _count(digest["rows"], f"{where}.rows")
    _text(digest["hash"], f"{where}.hash")
    allowed = {"rows", "hash", "bucket_size", "buckets"}
    if unknown := sorted(set(digest) - allowed):
        raise FormatProblem(f"{where} has an unknown field {unknown[0]!r}")
    if "bucket_size" in digest:
        _count(digest["bucket_size"], f"{where}.bucket_size", low=1)
    if "buckets" in digest:
        buckets = _object(digest["buckets"], f"{where}.buckets", "bucket hashes")
        for key, bucket in buckets.items():
            if not key.isascii() or not key.isdigit():
                raise FormatProblem(f"{where}.buckets has the key {_shown(key)}, not a bucket number")
            _text(bucket, f"{where}.buckets.{key}")


def _names(value: object, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise FormatProblem(f"{where} is {_shown(value)}, not a list of names")


def check(data: object) -> None:
    """Raise :class:`FormatProblem` naming the first field of ``data`` (a parsed fingerprint
    file) that a fingerprint could not hold; return when every field is as ``take`` writes it."""
    if not isinstance(data, dict):
        raise FormatProblem(f"the file holds {_kind(data)}, not a fingerprint object")
    formats = " or ".join(map(str, METHODS))
    fmt = data.get("format")
    if isinstance(fmt, bool) or fmt not in METHODS:
        raise FormatProblem(f"format is {_shown(fmt)}, not {formats}")
    if unknown := sorted(set(data) - FIELDS):
        raise FormatProblem(f"it has an unknown field {unknown[0]!r}")
    for key in REQUIRED:
        if key not in data:
            raise FormatProblem(f"it has no {key!r}")
    _text(data["taken_at"], "taken_at")
    _text(data["database"], "database", empty=True)
    for optional in ("source", "snapshot"):
        if data.get(optional) is not None:
            _text(data[optional], optional)
    for table, mark in _object(data["watermarks"], "watermarks", "tables and their highest ids").items():
        if mark is not None:
            _count(mark, f"watermarks.{table}")
    for table, digest in _object(data["tables"], "tables", "table digests").items():
        if digest is not None:  # null: the table did not exist
            _digest(digest, f"tables.{table}")
    for table, digest in _object(data.get("kept", {}), "kept", "table digests").items():
        if digest is not None:
            _digest(digest, f"kept.{table}")
    if data.get("natural") is not None:
        for table, digest in _object(data["natural"], "natural", "table digests").items():
            _digest(digest, f"natural.{table}")
    for part, digest in _object(data.get("mlflow", {}), "mlflow", "MLflow part digests").items():
        _digest(digest, f"mlflow.{part}")
    for name, count in _object(data.get("declared", {}), "declared", "declared counts").items():
        _count(count, f"declared.{name}")
    scope = data.get("scope")
    if scope is not None:
        scope = _object(scope, "scope", "what a baseline read")
        if not SCOPE_FIELDS <= set(scope) <= SCOPE_FIELDS | SCOPE_OPTIONAL:
            raise FormatProblem(f"scope has the fields {sorted(scope)}, not {sorted(SCOPE_FIELDS)}"
                                f" (and optionally {sorted(SCOPE_OPTIONAL)})")
        _names(scope["tables"], "scope.tables")
        _names(scope["parts"], "scope.parts")
        for table, rows in _object(scope["kept"], "scope.kept", "row conditions").items():
            _text(rows, f"scope.kept.{table}")
        _count(scope["first_run"], "scope.first_run", low=1)
        for part, rows in _object(scope.get("part_rows", {}), "scope.part_rows", "row conditions").items():
            _text(rows, f"scope.part_rows.{part}")
