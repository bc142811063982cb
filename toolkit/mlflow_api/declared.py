"""A request's parameters read as GitLab's Grape routes declare them, and the Rails
validations the tracking writes repeat.

GitLab answers a parameter error before the endpoint runs (400 ``{"error": "key is
missing, value is invalid"}``, every failure together, in declaration order) and a model
validation failing as ``Validation failed: …`` (``create!``); the tracking endpoints
(:mod:`toolkit.mlflow_api.experiment_writes`, :mod:`toolkit.mlflow_api.run_writes`) read
their parameters and check their rows through this module, so both answers read as
GitLab's.
"""

from __future__ import annotations

import math
from typing import Any

from toolkit.mlflow_api import rails
from toolkit.mlflow_api.errors import ApiError, grape_errors, invalid_parameter


class Declared:
    """A request's parameters read as Grape's ``params do … end`` reads them: every
    declared parameter is checked, the failures are answered together, in declaration
    order (``key is missing, value is invalid``)."""

    def __init__(self, params: dict[str, Any], prefix: str = ""):
        self.params = params
        self.prefix = prefix
        self.errors: list[str] = []

    def _name(self, name: str) -> str:
        return f"{self.prefix}[{name}]" if self.prefix else name

    def _present(self, name: str, required: bool) -> bool:
        if name not in self.params:
            if required:
                self.errors.append(f"{self._name(name)} is missing")
            return False
        return self.params[name] is not None

    def string(self, name: str, *, required: bool = False, default: Any = None,
               values: list[str] | None = None) -> Any:
        if not self._present(name, required):
            return default
        value = self.params[name]
        if isinstance(value, (list, dict)):
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        text = ("true" if value else "false") if isinstance(value, bool) else (
            repr(value) if isinstance(value, float) else str(value))
        if values is not None and text not in values:
            self.errors.append(f"{self._name(name)} does not have a valid value")
            return None
        return text

    def integer(self, name: str, *, required: bool = False, default: int | None = None) -> int | None:
        if not self._present(name, required):
            return default
        value = self.params[name]
        if value == "":
            return None
        try:
            number = rails.grape_integer({name: value}, name, 0)
        except ApiError:
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        if not rails.BIGINT_MIN <= number <= rails.BIGINT_MAX:
            self.errors.append(f"{self._name(name)} is invalid")  # beyond the column
            return None
        return number

    def float(self, name: str, *, required: bool = False) -> float | None:
        """``type: Float``: a JSON number, or text Ruby's ``Float()`` reads."""
        if not self._present(name, required):
            return None
        value = self.params[name]
        if isinstance(value, (bool, list, dict)):
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip()
        try:
            number = float(text.replace("_", "")) if text and not text.lower().lstrip("+-").startswith(
                ("nan", "inf")) else None
        except ValueError:
            number = None
        if number is None or math.isnan(number):
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        return number

    def array(self, name: str, *, default: list | None = None) -> list[Any] | None:
        if not self._present(name, False):
            return default
        value = self.params[name]
        if not isinstance(value, list):
            self.errors.append(f"{self._name(name)} is invalid")
            return None
        return value

    def items(self, name: str, values: list[Any]) -> list[Declared]:
        """The hashes of an array parameter declared with a block, each read with its own
        ``name[i]`` prefix into this one's errors."""
        found = []
        for index, value in enumerate(values):
            if not isinstance(value, dict):
                self.errors.append(f"{name}[{index}] is invalid")
                continue
            item = Declared(value, f"{name}[{index}]")
            item.errors = self.errors
            found.append(item)
        return found

    def check(self) -> None:
        if self.errors:
            raise grape_errors(*self.errors)


def validation_failed(*messages: str) -> ApiError:
    """``create!`` failing its validations: RecordInvalid, answered by GitLab's rescue_from."""
    return invalid_parameter("Validation failed: " + ", ".join(messages))


def length_presence(errors: list[str], label: str, value: str | None, maximum: int) -> None:
    if value is not None and len(value) > maximum:
        errors.append(f"{label} is too long (maximum is {maximum} characters)")


def blank(value: str | None) -> bool:
    return value is None or rails.blank(value)


def metadata_validation(key: str | None, value: str | None, taken: bool) -> list[str]:
    """``Ml::ExperimentMetadata`` / ``CandidateMetadata`` / ``ModelMetadata`` validations,
    in their order: name length 250, presence, uniqueness (``'<name>' already taken``);
    value length 5000, presence."""
    errors: list[str] = []
    length_presence(errors, "Name", key, 250)
    if blank(key):
        errors.append("Name can't be blank")
    elif taken:
        errors.append(f"Name '{key}' already taken")
    length_presence(errors, "Value", value, 5000)
    if blank(value):
        errors.append("Value can't be blank")
    return errors
