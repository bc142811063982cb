"""How GitLab reads a request's values: Grape's coercion of declared parameters, Rails'
casting of a value compared with an integer or uuid column, and the Ruby string
operations GitLab's helpers apply to ``order_by``.

Each function answers what GitLab's code answers for the same input, so that an odd value
(``experiment_id=12abc``, a run id in braces, ``order_by`` as a list) finds the same row
or the same error here as on GitLab.
"""

from __future__ import annotations

import math
import re
from typing import Any

from toolkit.mlflow_api.errors import invalid, invalid_parameter, missing

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
ABSENT = object()  # a parameter the request does not carry at all (Grape: key absent)

# Ruby's awk-style ``split(' ')`` splits on ASCII whitespace runs and drops the edges;
# ``blank?`` is true for a string of Unicode White_Space characters only.
_AWK_SPACE = " \t\n\v\f\r"
_UNICODE_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000")
# ActiveModel::Type::Integer: a string that does not start like a number casts to nil,
# one that does casts with Ruby's String#to_i (leading digits, underscores between them).
_NUMERIC_START = re.compile(r"\A\s*[+-]?\d", re.ASCII)
_TO_I = re.compile(r"\s*([+-]?)(\d+(?:_\d+)*)", re.ASCII)
# Grape's Integer coercion (dry-types Params::Integer → Kernel#Integer(str, 10))
_INTEGER_TEXT = re.compile(r"[ \t\n\v\f\r]*[+-]?\d+(?:_\d+)*[ \t\n\v\f\r]*", re.ASCII)
# ActiveRecord's PostgreSQL uuid type: ACCEPTABLE_UUID
_UUID = re.compile(r"(\{)?(?:[a-fA-F0-9]{4}-?){8}(?(1)\})")


def storable(text: str) -> bool:
    """Whether PostgreSQL can take the text as a parameter: no NUL, no lone surrogate
    (what JSON's ``\\u0000`` and ``\\ud800`` give). A value it cannot take matches no
    row, which is what comparing it would have found."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def blank(text: str) -> bool:
    """ActiveSupport's ``String#blank?``."""
    return all(ch in _UNICODE_SPACE for ch in text)


def awk_split(text: str) -> list[str]:
    """Ruby's ``text.split(' ')``."""
    return [word for word in re.split(f"[{_AWK_SPACE}]+", text) if word]


def dot_split(text: str) -> list[str]:
    """Ruby's ``text.split('.')``: trailing empty fields are dropped."""
    parts = text.split(".")
    while parts and parts[-1] == "":
        parts.pop()
    return parts


def integer_cast(value: Any) -> int | None:
    """What a Rails ``where(iid: value)`` compares with: the integer, or None when Rails
    casts the value to nil or it is beyond a bigint (neither finds a row)."""
    if isinstance(value, bool):
        number: int | None = int(value)
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = int(value) if math.isfinite(value) else None
    elif isinstance(value, str):
        if not _NUMERIC_START.match(value):
            return None
        found = _TO_I.match(value)
        digits = found[2].replace("_", "").lstrip("0") if found else ""
        if found and len(digits) > 19:
            return None  # beyond any bigint (and past Python's int() digit limit)
        number = int(found[1] + (digits or "0")) if found else None
    else:
        return None
    if number is None or not BIGINT_MIN <= number <= BIGINT_MAX:
        return None
    return number


def uuid_cast(value: str) -> str | None:
    """What a Rails ``where(eid: value)`` compares with: the uuid, or None (no row)."""
    if not _UUID.fullmatch(value):
        return None
    digits = value.strip("{}").replace("-", "").lower()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def grape_string(params: dict[str, Any], name: str, *, required: bool = False,
                 default: Any = None) -> Any:
    """A parameter declared ``type: String``: its default when not given or null, else
    its text. ``requires`` checks only that the key is there (a JSON null
    passes); an array or object is ``<name> is invalid``."""
    if name not in params:
        if required:
            raise missing(name)
        return default
    value = params[name]
    if value is None:
        return default
    if isinstance(value, (list, dict)):
        raise invalid(name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def grape_integer(params: dict[str, Any], name: str, default: int) -> int:
    """A parameter declared ``type: Integer`` with a default."""
    value = params.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, (bool, list, dict)):
        raise invalid(name)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise invalid(name)
        return int(value)
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
        text = value.strip(_AWK_SPACE).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-").lstrip("0") or "0"
        # Ruby reads any length; past 1000 only the sign matters here
        return int(digits) * sign if len(digits) <= 19 else sign * (10**19)
    raise invalid(name)


def grape_array(params: dict[str, Any], name: str) -> list[Any] | None:
    """A parameter declared ``requires :name, type: Array``."""
    if name not in params:
        raise missing(name)
    value = params[name]
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid(name)
    return value


def page_size(params: dict[str, Any], default: int, limit: int) -> int:
    """``max_results``: GitLab takes ``[max_results, 1000].min`` (here the server's own
    limit, at most 1000). Below 1 GitLab fails (500: a negative LIMIT, or a cursor for a
    page it emptied); the toolkit refuses it as an invalid parameter."""
    size = grape_integer(params, "max_results", default)
    if size < 1:
        raise invalid_parameter(f"max_results must be at least 1, not {size}")
    return min(size, limit)
