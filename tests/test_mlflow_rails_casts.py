"""How GitLab's Rails and Grape read a value, case by case (``toolkit.mlflow_api.rails``):
the expected values are Ruby's and Rails' documented behaviour (``String#to_i``,
``ActiveModel::Type::Integer``, the PostgreSQL uuid type's ``ACCEPTABLE_UUID``, Grape's
Integer coercion, ``String#split``, ``blank?``)."""

from __future__ import annotations

import pytest

from toolkit.mlflow_api import rails
from toolkit.mlflow_api.errors import ApiError


@pytest.mark.parametrize(("given", "expected"), [
    ("12", 12), ("12abc", 12), (" 12", 12), ("+7", 7), ("-3", -3), ("1_000", 1000), ("007", 7),
    ("abc", None), ("", None), ("1.9", 1), (True, 1), (2.7, 2), (float("inf"), None),
    ("9223372036854775807", 2**63 - 1), ("9223372036854775808", None), ("9" * 5000, None),
    ([1], None), ({"a": 1}, None),
])
def test_integer_cast_is_rails(given, expected):
    assert rails.integer_cast(given) == expected


@pytest.mark.parametrize(("given", "expected"), [
    ("0a0b0c0d-0000-4000-8000-00000000000f", "0a0b0c0d-0000-4000-8000-00000000000f"),
    ("{0A0B0C0D000040008000000000000000}", "0a0b0c0d-0000-4000-8000-000000000000"),
    ("0a0b0c0d000040008000000000000000", "0a0b0c0d-0000-4000-8000-000000000000"),
    ("{0a0b0c0d000040008000000000000000", None), ("0a0b0c0d-0000-4000-8000-00000000000", None),
    ("urn:uuid:0a0b0c0d-0000-4000-8000-000000000000", None), ("", None),
])
def test_uuid_cast_is_postgresql_types(given, expected):
    assert rails.uuid_cast(given) == expected


def test_grape_reads_integers_strings_and_arrays():
    assert rails.grape_integer({"n": " 12 "}, "n", 200) == 12
    assert rails.grape_integer({}, "n", 200) == 200
    assert rails.grape_integer({"n": None}, "n", 200) == 200
    for bad in ("1.5", "abc", True, [1], {"a": 1}, float("nan")):
        with pytest.raises(ApiError) as caught:
            rails.grape_integer({"n": bad}, "n", 200)
        assert (caught.value.status, caught.value.document()) == (400, {"error": "n is invalid"})
    assert rails.grape_string({"s": 5}, "s") == "5"
    assert rails.grape_string({}, "s", default="") == ""
    with pytest.raises(ApiError) as caught:
        rails.grape_string({}, "run_id", required=True)
    assert caught.value.document() == {"error": "run_id is missing"}
    with pytest.raises(ApiError) as caught:
        rails.grape_array({"ids": "1"}, "ids")
    assert caught.value.document() == {"error": "ids is invalid"}
    with pytest.raises(ApiError) as caught:
        rails.page_size({"max_results": 0}, 200, 1000)
    assert caught.value.document()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert rails.page_size({"max_results": 5000}, 200, 1000) == 1000


def test_ruby_string_operations():
    assert rails.awk_split("  name \t DESC ") == ["name", "DESC"]
    assert rails.awk_split("a\u00a0b") == ["a\u00a0b"]  # only ASCII whitespace splits
    assert rails.dot_split("metrics.a.b") == ["metrics", "a", "b"]
    assert rails.dot_split("metrics.") == ["metrics"]
    assert rails.dot_split("metrics..x") == ["metrics", "", "x"]
    assert rails.blank("") and rails.blank(" \t\u3000") and not rails.blank("a")
    assert not rails.storable("a\x00") and not rails.storable("\ud800") and rails.storable("ü")
