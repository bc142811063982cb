"""What the model-registry writes answer and how they read a request, as GitLab's.

GitLab's error answers for these routes (``resource_already_exists!``, ``update_failed!``,
a service's list of messages), the parameters as Grape coerces them, and the Rails
validations (a model's name, the metadata rows) that
:mod:`toolkit.mlflow_api.model_writes` and :mod:`toolkit.mlflow_api.version_writes` repeat
before they write.
"""

from __future__ import annotations

from typing import Any

from toolkit.milestones.slug import MODEL_NAME
from toolkit.mlflow_api import rails
from toolkit.mlflow_api.errors import ApiError, grape_errors, invalid


# -- GitLab's answers ------------------------------------------------------------------------
def resource_already_exists() -> ApiError:
    """api_helpers.rb ``resource_already_exists!``: 400, no message."""
    return ApiError(400, body={"error_code": "RESOURCE_ALREADY_EXISTS"})


def update_failed() -> ApiError:
    """api_helpers.rb ``update_failed!``: 400, no message."""
    return ApiError(400, body={"error_code": "UPDATE_FAILED"})


def service_error(*messages: str) -> ApiError:
    """``invalid_parameter!(result.message)`` where the service's message is a list of
    error strings: GitLab sends the list as it is."""
    return ApiError(400, body={"error_code": "INVALID_PARAMETER_VALUE", "message": list(messages)})


def invalid_parameter_without_message() -> ApiError:
    """``invalid_parameter!`` with no argument: the message is null."""
    return ApiError(400, body={"error_code": "INVALID_PARAMETER_VALUE", "message": None})


# -- Rails' checks ---------------------------------------------------------------------------
def _blank(value: str | None) -> bool:
    return value is None or rails.blank(value)


def metadata_errors(tags: list[dict[str, str | None]], name_max: int) -> list[str]:
    """The ``Validation failed: …`` message ``create!`` raises for the first invalid tag
    (ModelMetadata / ModelVersionMetadata: name present, at most ``name_max``, unique per
    owner; value present, at most 5000), or an empty list."""
    seen: set[str] = set()
    for tag in tags:
        name, value = tag["key"], tag["value"]
        errors = []
        if name is not None and len(name) > name_max:
            errors.append(f"Name is too long (maximum is {name_max} characters)")
        if _blank(name):
            errors.append("Name can't be blank")
        elif name in seen:
            errors.append(f"Name '{name}' already taken")
        if value is not None and len(value) > 5000:
            errors.append("Value is too long (maximum is 5000 characters)")
        if _blank(value):
            errors.append("Value can't be blank")
        if errors:
            return ["Validation failed: " + ", ".join(errors)]
        seen.add(name or "")
    return []


def read_tags(params: dict[str, Any]) -> list[dict[str, str | None]]:
    """``optional :tags, type: Array``: each entry's ``key`` and ``value`` as GitLab reads
    them (``d[:key]``, ``d[:value]``), as text."""
    raw = params.get("tags")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid("tags")
    tags = []
    for entry in raw:
        if not isinstance(entry, dict):
            # GitLab fails with a 500 here (String#[] with a Symbol); the toolkit says why
            raise grape_errors("tags is invalid (each tag is an object with key and value)")
        tags.append({field: None if entry.get(field) is None else _text(entry[field], "tags")
                     for field in ("key", "value")})
    return tags


def _text(value: Any, name: str) -> str:
    """A value Grape coerces to String (a JSON number or boolean becomes its text)."""
    if isinstance(value, (list, dict)):
        raise invalid(name)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, float) else str(value)
    if not rails.storable(text):
        raise invalid(name)
    return text


def read_string(params: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = rails.grape_string(params, name, required=required)
    if value is not None and not rails.storable(value):
        raise invalid(name)
    return value


def is_valid_model_name(name: str | None) -> bool:
    """Ml::Model's name rules: present, at most 255, ``ml_model_name_regex``."""
    return (name is not None and not rails.blank(name) and len(name) <= 255
            and MODEL_NAME.match(name) is not None)
