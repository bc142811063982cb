"""The error documents GitLab's MLflow API answers with, exactly as GitLab builds them.

GitLab answers an MLflow client in three shapes, and a script that works against one
must meet the same shape here:

* its own MLflow helpers (``lib/api/ml/mlflow/api_helpers.rb``): ``resource_not_found!``
  is 404 ``{"error_code": "RESOURCE_DOES_NOT_EXIST"}`` with no message,
  ``invalid_parameter!(message)`` is 400 ``{"error_code": "INVALID_PARAMETER_VALUE",
  "message": message}``;
* Grape's parameter validation (``lib/api/api.rb`` rescues ``Grape::Exceptions::Base``
  with ``error!(e.message, 400)``, which Grape's JSON error formatter wraps as
  ``{"error": message}``): ``run_id is missing``, ``order_by is invalid``, several joined
  with ``", "``;
* ``lib/api/helpers.rb``'s ``not_found!('Project')``: 404 ``{"message": "404 Project Not
  Found"}``.
"""

from __future__ import annotations

from typing import Any

# SQLSTATEs a request may meet, by what the server does about them.
# A catalog change under a request: the stage moved on (milestone 4 dropped a table); again.
STAGE_CHANGED = frozenset({"42P01", "42703"})  # undefined table, undefined column
# connection exceptions, too many connections, operator intervention (shutdown, restart)
UNAVAILABLE = ("08", "53300", "57P01", "57P02", "57P03")
BUSY = {"55P03": "a lock it needed was held too long", "57014": "it ran longer than its statement_timeout"}
# a write that met another transaction: serialization failure, deadlock; run it again
CONFLICT = frozenset({"40001", "40P01"})


class ApiError(Exception):
    """An answer that is not 200: the HTTP status and the JSON document sent with it.

    ``ApiError(status, error_code, message)`` is MLflow's shape (``error_code`` and
    ``message``); ``ApiError(status, body={...})`` carries any document as it is.
    """

    def __init__(self, status: int, error_code: str | None = None, message: str | None = None, *,
                 body: dict[str, Any] | None = None, headers: tuple[tuple[str, str], ...] = ()):
        if body is None:
            body = {"error_code": error_code, "message": message}
        self.status = status
        self.body = body
        self.headers = headers  # e.g. WWW-Authenticate on GitLab's OAuth errors
        self.error_code = body.get("error_code")
        self.message = str(body.get("message") or body.get("error") or "")
        super().__init__(self.message or repr(body))

    def document(self) -> dict[str, Any]:
        return dict(self.body)


def resource_not_found() -> ApiError:
    """``resource_not_found!``: an experiment, run or model the project does not have."""
    return ApiError(404, body={"error_code": "RESOURCE_DOES_NOT_EXIST"})


def invalid_parameter(message: str | None) -> ApiError:
    """``invalid_parameter!(message)``, also what GitLab answers for any ActiveRecord error
    (``entrypoint.rb`` rescues ``ActiveRecord::ActiveRecordError`` with it)."""
    return ApiError(400, body={"error_code": "INVALID_PARAMETER_VALUE", "message": message})


def grape_errors(*messages: str) -> ApiError:
    """Grape's validation failure: every failed parameter's message, joined as Grape joins them."""
    unique = list(dict.fromkeys(messages))
    return ApiError(400, body={"error": ", ".join(unique)})


def missing(name: str) -> ApiError:
    return grape_errors(f"{name} is missing")


def invalid(name: str, note: str = "") -> ApiError:
    """``<name> is invalid``; ``note`` (the toolkit's explanation) follows GitLab's text."""
    return grape_errors(f"{name} is invalid{note}")


def project_not_found() -> ApiError:
    return ApiError(404, body={"message": "404 Project Not Found"})
