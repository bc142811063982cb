"""Tokens, scopes and project access for ``toolkit mlflow serve``, checked as GitLab checks them.

A script that works against the toolkit must work against GitLab, so a request is let in
or turned away exactly where GitLab's would be, with GitLab's status and document
(docs/mlflow.md, "Tokens and access", names the GitLab files followed):

1. the token (``lib/gitlab/auth/auth_finders.rb``): the ``private_token`` parameter, the
   ``PRIVATE-TOKEN`` header, then Doorkeeper's ``access_token`` parameter, ``Authorization:
   Bearer …`` and ``bearer_token`` parameter. None: 401 ``{"message":"401 Unauthorized"}``
   (``authenticate!``); one no token matches, or whose user is gone: the same 401;
2. expired, then revoked (``AccessTokenValidationService``): 401 with rack-oauth2's
   ``invalid_token`` document and ``WWW-Authenticate`` header;
3. the user (``APIGuard#find_current_user!``): blocked, deactivated or pending approval:
   403 ``{"message":"403 Forbidden - <GitLab's reason>"}``;
4. the scope (``allow_access_with_scope`` in ``lib/api/ml/mlflow/entrypoint.rb``): ``api``,
   or ``read_api`` for GET and HEAD only; else 403 ``insufficient_scope`` (so a ``read_api``
   token is refused on the POST searches, as on GitLab);
5. the project (``find_project!`` and ``app/policies/project_policy.rb``): not readable:
   404 ``{"message":"404 Project Not Found"}``; ``read_model_experiments`` /
   ``read_model_registry`` missing: 404 ``{"message":"404 Not Found"}``;
   ``write_model_experiments`` / ``write_model_registry`` missing: 401 (``check_api_write!``).

Two token sources, either or both: the instance's personal access tokens (the table
``personal_access_tokens``, found by the digest GitLab stores, which needs the key in
``/etc/gitlab/gitlab-secrets.json``), and a tokens file the operator writes for a
rehearsal copy. A token is never printed, logged, or kept in the clear in memory longer
than the request that carries it: the file's tokens are held as SHA-256 digests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from sqlalchemy.engine import Connection

from toolkit.errors import UsageProblem
from toolkit.mlflow_api.views import ApiError

# What an endpoint needs: GitLab's ProjectPolicy abilities, in the order GitLab checks them.
READ_EXPERIMENTS = "read_model_experiments"
WRITE_EXPERIMENTS = "write_model_experiments"
READ_REGISTRY = "read_model_registry"
WRITE_REGISTRY = "write_model_registry"

# Gitlab::Access; Gitlab::VisibilityLevel
GUEST, DEVELOPER = 10, 30
PRIVATE, INTERNAL, PUBLIC = 0, 10, 20
READ_METHODS = ("GET", "HEAD")

# registered-models and model-versions calls GitLab marks `route_setting :api, write: true`
REGISTRY_WRITES = {"registered-models/create", "registered-models/update", "registered-models/delete",
                   "model-versions/create", "model-versions/update"}
# The scopes the MLflow entrypoint registers, as rack-oauth2 lists them in its 403.
ENDPOINT_SCOPES = "api read_api"
OAUTH_REALM = "Protected by OAuth 2.0"  # rack-oauth2's DEFAULT_REALM
INSUFFICIENT_SCOPE = "The request requires higher privileges than provided by the access token."
EXPIRED = "Token is expired. You can either do re-authorization or token refresh."
REVOKED = "Token was revoked. You have to re-authorize from the user."
# Gitlab::Auth::UserAccessDeniedReason, by users.state
DENIED = {
    "blocked_pending_approval": "Your account is pending approval from your administrator and hence blocked.",
    "deactivated": "Your account has been deactivated by your administrator. Please log back in from a "
                   "web browser to reactivate your account at {url}",
    "blocked": "Your account has been blocked.",
    "ldap_blocked": "Your account has been blocked.",
    "banned": "Your account has been blocked.",
}


@dataclass(frozen=True)
class User:
    id: int
    username: str


@dataclass(frozen=True)
class Token:
    """A token as GitLab validates it: whose, with which scopes, until when."""

    user: int | str  # users.id, or a username (tokens file)
    scopes: frozenset[str]
    revoked: bool = False
    expires_at: date | None = None


# --- GitLab's error documents -----------------------------------------------------------------
def gitlab_error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> ApiError:
    """``render_api_error!``: ``{"message": …}``."""
    return ApiError(status, "", message, body={"message": message}, headers=headers)


def unauthorized() -> ApiError:
    return gitlab_error(401, "401 Unauthorized")


def forbidden(reason: str) -> ApiError:
    return gitlab_error(403, f"403 Forbidden - {reason}")


def invalid_token(description: str) -> ApiError:
    """rack-oauth2's ``Bearer::Unauthorized(:invalid_token, …)``."""
    header = f'Bearer realm="{OAUTH_REALM}", error="invalid_token", error_description="{description}"'
    return ApiError(401, "", description, body={"error": "invalid_token", "error_description": description},
                    headers=(("WWW-Authenticate", header),))


def insufficient_scope() -> ApiError:
    """rack-oauth2's ``Bearer::Forbidden(:insufficient_scope, …, scope: …)``."""
    return ApiError(403, "", INSUFFICIENT_SCOPE, body={
        "error": "insufficient_scope", "error_description": INSUFFICIENT_SCOPE, "scope": ENDPOINT_SCOPES})


# --- what an endpoint needs -------------------------------------------------------------------
def needs_for(endpoint: str, method: str) -> tuple[str, ...]:
    """The abilities GitLab's ``before`` blocks check for ``endpoint`` (the path after
    ``…/mlflow/`` or ``mlflow-artifacts/``), in their order."""
    if endpoint.startswith(("registered-models/", "model-versions/")):
        writes = (WRITE_EXPERIMENTS, WRITE_REGISTRY) if endpoint in REGISTRY_WRITES else ()
        return (READ_EXPERIMENTS, READ_REGISTRY, *writes)
    if endpoint.startswith("artifacts"):  # mlflow-artifacts: reads only, whatever the route says
        return (READ_EXPERIMENTS, READ_REGISTRY)
    return (READ_EXPERIMENTS,) if method in READ_METHODS else (READ_EXPERIMENTS, WRITE_EXPERIMENTS)


# --- the token a request carries --------------------------------------------------------------
_BEARER = re.compile(r"^Bearer ", re.IGNORECASE)


def presented_token(headers: Any, params: Mapping[str, Any]) -> str | None:
    """``headers``: anything with ``items()`` (http.server's message, a dict from a WSGI
    environ). GitLab's order: ``private_token`` parameter, ``PRIVATE-TOKEN`` header, then Doorkeeper's
    ``access_token`` parameter, ``Authorization: Bearer`` and ``bearer_token`` parameter."""
    def param(name: str) -> str | None:
        value = params.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, str) and value else None

    named = {str(name).lower(): value for name, value in headers.items()}  # any case, any mapping
    authorization = named.get("authorization") or ""
    bearer = _BEARER.sub("", authorization) if _BEARER.match(authorization) else None
    return (param("private_token") or (named.get("private-token") or None) or param("access_token")
            or bearer or param("bearer_token"))


def scopes_from_column(text: str | None) -> frozenset[str]:
    """``personal_access_tokens.scopes``: Rails' YAML of an array (``"---\\n- api\\n"``),
    symbols written ``:api`` by older GitLabs."""
    try:
        loaded = yaml.safe_load(text or "") or []
        items = loaded if isinstance(loaded, list) else []
    except yaml.YAMLError:
        items = re.findall(r"^- (\S+)$", text or "", re.MULTILINE)
    return frozenset(str(item).lstrip(":") for item in items)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- the two token sources --------------------------------------------------------------------
class DatabaseTokens:
    """The instance's personal access tokens: ``personal_access_tokens.token_digest`` is
    ``Gitlab::CryptoHelper.sha256(token)``, Base64 of SHA-256 of the token followed by
    ``db_key_base`` truncated to 32 characters (``Settings.attr_encrypted_db_key_base_truncated``);
    with rotated keys, one digest per key."""

    def __init__(self, keys: list[str]):
        self.salts = [key[:32] for key in keys]

    @classmethod
    def from_secrets_file(cls, path: Path) -> DatabaseTokens:
        try:
            secrets = json.loads(path.read_text())
            keys = secrets["gitlab_rails"]["db_key_base"]
        except OSError as exc:
            raise UsageProblem(f"Cannot read --gitlab-secrets {path}: {exc.strerror or exc}",
                               "give GitLab's /etc/gitlab/gitlab-secrets.json") from None
        except (ValueError, KeyError, TypeError):
            raise UsageProblem(f"--gitlab-secrets {path} has no gitlab_rails.db_key_base",
                               "give GitLab's /etc/gitlab/gitlab-secrets.json") from None
        keys = [keys] if isinstance(keys, str) else keys
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise UsageProblem(f"--gitlab-secrets {path}: gitlab_rails.db_key_base is empty",
                               "give GitLab's /etc/gitlab/gitlab-secrets.json")
        return cls(keys)

    def digests(self, token: str) -> list[str]:
        return list(dict.fromkeys(base64.b64encode(hashlib.sha256((token + salt).encode()).digest()).decode()
                                  for salt in self.salts))

    def find(self, conn: Connection, token: str) -> Token | None:
        row = conn.execute(sa.text("""
            SELECT user_id, revoked, expires_at, scopes FROM personal_access_tokens
            WHERE token_digest = ANY(:digests) ORDER BY id LIMIT 1"""),
            {"digests": self.digests(token)}).first()
        if row is None:
            return None
        return Token(row.user_id, scopes_from_column(row.scopes), bool(row.revoked), row.expires_at)

    def describe(self) -> str:
        return "the database's personal_access_tokens (digests keyed by --gitlab-secrets)"


class FileTokens:
    """The operator's tokens file for a rehearsal copy: a YAML list of ``{token, user,
    scopes}`` (``user`` a username or id; ``expires_at`` and ``revoked`` optional)."""

    def __init__(self, entries: dict[str, Token]):
        self.entries = entries  # by the token's SHA-256

    @classmethod
    def from_file(cls, path: Path) -> FileTokens:
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise UsageProblem(f"Cannot read --tokens-file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError:
            raise UsageProblem(f"--tokens-file {path} is not YAML",
                               "write a list of {token: ..., user: ..., scopes: [api]}") from None
        if not isinstance(loaded, list) or not loaded:
            raise UsageProblem(f"--tokens-file {path} holds no list of tokens",
                               "write a list of {token: ..., user: ..., scopes: [api]}")
        entries: dict[str, Token] = {}
        for number, entry in enumerate(loaded, 1):
            where = f"--tokens-file {path}, entry {number}"  # never the token itself
            if not isinstance(entry, dict):
                raise UsageProblem(f"{where} is not a mapping of token, user and scopes")
            token, user, scopes = entry.get("token"), entry.get("user"), entry.get("scopes")
            if not isinstance(token, str) or len(token) < 8:
                raise UsageProblem(f"{where}: token must be a string of 8 characters or more")
            if isinstance(user, bool) or not isinstance(user, int | str) or user == "":
                raise UsageProblem(f"{where}: user must be a username or a user id")
            if (not isinstance(scopes, list) or not scopes
                    or not all(isinstance(s, str) and s for s in scopes)):
                raise UsageProblem(f"{where}: scopes must be a list such as [api] or [read_api]")
            expires = entry.get("expires_at")
            if expires is not None and not isinstance(expires, date):
                raise UsageProblem(f"{where}: expires_at must be a date (YYYY-MM-DD)")
            if _digest(token) in entries:
                raise UsageProblem(f"{where}: the same token is given twice")
            revoked = bool(entry.get("revoked", False))
            entries[_digest(token)] = Token(user, frozenset(scopes), revoked, expires)
        return cls(entries)

    def find(self, conn: Connection, token: str) -> Token | None:
        wanted = _digest(token)
        for digest, entry in self.entries.items():  # compared in constant time, all of them
            if hmac.compare_digest(digest, wanted):
                return entry
        return None

    def users(self) -> list[int | str]:
        return [entry.user for entry in self.entries.values()]

    def describe(self) -> str:
        return f"a tokens file ({len(self.entries)} tokens)"


TokenSource = DatabaseTokens | FileTokens


def missing_users(conn: Connection, users: list[int | str]) -> list[str]:
    """The tokens file's users that ``users`` lacks."""
    missing = []
    for user in dict.fromkeys(users):
        if _user_row(conn, user) is None:
            missing.append(str(user))
    return missing


def _user_row(conn: Connection, user: int | str) -> sa.Row | None:
    where: str
    value: int | str
    if isinstance(user, int):
        where, value = "id = :u", user
    else:
        where, value = "username = :u", user
    return conn.execute(sa.text(f"SELECT id, username, state, admin FROM users WHERE {where}"),
                        {"u": value}).first()


# --- the check ------------------------------------------------------------------------------
class Authenticator:
    """Turns a request into its GitLab user, or raises GitLab's answer (:class:`ApiError`)."""

    def __init__(self, sources: list[TokenSource], gitlab_url: str = "",
                 today: Callable[[], date] = lambda: datetime.now(UTC).date()):
        self.sources = sources
        self.gitlab_url = gitlab_url
        self.today = today

    def describe(self) -> str:
        return " and ".join(source.describe() for source in self.sources)

    def authenticate(self, conn: Connection, method: str, headers: Any,
                     params: Mapping[str, Any], project_id: int | None, needs: tuple[str, ...]) -> User:
        """GitLab's checks in GitLab's order; ``project_id`` None: no such project."""
        token_text = presented_token(headers, params)
        if token_text is None:
            raise unauthorized()
        token = next((t for s in self.sources if (t := s.find(conn, token_text)) is not None), None)
        if token is None:
            raise unauthorized()
        if token.expires_at is not None and token.expires_at <= self.today():
            raise invalid_token(EXPIRED)
        if token.revoked:
            raise invalid_token(REVOKED)
        row = _user_row(conn, token.user)
        if row is None:
            raise unauthorized()
        state = row.state or "active"
        if state != "active":
            raise forbidden(DENIED.get(state, "Your account has been blocked.").format(url=self.gitlab_url))
        if not ("api" in token.scopes or ("read_api" in token.scopes and method in READ_METHODS)):
            raise insufficient_scope()
        check_project(conn, row, project_id, needs)
        return User(row.id, row.username)


def check_project(conn: Connection, user: sa.Row, project_id: int | None, needs: tuple[str, ...]) -> None:
    """``find_project!`` then ``check_api_read!`` / ``check_api_write!`` and their registry
    twins. Model experiments and the registry are taken as enabled for the project (GitLab's
    default access level, 20); ``project_features`` is not read."""
    found = None
    if project_id is not None:
        found = conn.execute(sa.text("""
            SELECT p.visibility_level,
                   (SELECT max(a.access_level) FROM project_authorizations a
                    WHERE a.project_id = p.id AND a.user_id = :u) AS access_level
            FROM projects p WHERE p.id = :p"""), {"p": project_id, "u": user.id}).first()
    if found is None:
        raise gitlab_error(404, "404 Project Not Found")
    level = found.access_level or 0
    visibility = found.visibility_level
    # read_project: members, admins (owner_access), anyone on a public project, any user on
    # an internal one
    if not (level >= GUEST or user.admin or visibility in (PUBLIC, INTERNAL)):
        raise gitlab_error(404, "404 Project Not Found")
    for need in needs:
        if need in (READ_EXPERIMENTS, READ_REGISTRY):
            # `public_project` or `~public_project & guest`: membership, not admin
            if not (visibility == PUBLIC or level >= GUEST):
                raise gitlab_error(404, "404 Not Found")
        elif level < DEVELOPER:  # `developer & model_*_enabled`
            raise unauthorized()
