"""Which database a command talks to, and how: URL resolution, masking, engine, errors.

Order of precedence: ``--database-url``, then ``TOOLKIT_DATABASE_URL``, then the running
sandbox (and the command says so, so nobody mistakes the sandbox for production). The
password never leaves this module unmasked: :func:`describe` is what every message uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from toolkit.errors import (
    DatabaseProblem,
    LockUnavailable,
    PreconditionRefused,
    ToolkitError,
    UsageProblem,
    redact,
)

DATABASE_URL_ENV = "TOOLKIT_DATABASE_URL"
APPLICATION_NAME = "toolkit"
# Every session of the toolkit waits at most this long for a lock (batches set their own,
# shorter, limit): a read must fail clearly rather than queue behind an ACCESS EXCLUSIVE lock.
SESSION_LOCK_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class Target:
    url: URL
    source: str  # "option", "environment" or "sandbox"

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.url.password,) if self.url.password else ()

    def describe(self) -> str:
        return self.url.set(drivername="postgresql").render_as_string(hide_password=True)


def parse_url(raw: str) -> URL:
    """Accept the URL forms operators have at hand (libpq's ``postgres://`` included)."""
    try:
        url = make_url(raw.strip())
    except ArgumentError as exc:
        raise UsageProblem(
            f"Cannot parse the database URL {redact(raw)!r}",
            "give a URL like postgresql://user@host:5432/gitlabhq_production",
        ) from exc
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise UsageProblem(
            f"The toolkit works on PostgreSQL only, not {url.get_backend_name()!r}",
            "give a postgresql:// URL of the GitLab database",
        )
    return url.set(drivername="postgresql+psycopg")


def resolve_target(url_option: str | None) -> Target:
    if url_option:
        return Target(parse_url(url_option), "option")
    if raw := os.environ.get(DATABASE_URL_ENV):
        return Target(parse_url(raw), "environment")
    from toolkit.sandbox.server import SandboxServer

    status = SandboxServer().status()
    if not status.running:
        raise PreconditionRefused(
            "No database given and the sandbox is not running",
            f"pass --database-url, set {DATABASE_URL_ENV}, or run `toolkit sandbox start`",
        )
    return Target(parse_url(status.url()), "sandbox")


def create_engine(target: Target | URL | str, **kwargs: object) -> Engine:
    if isinstance(target, Target):
        url = target.url
    else:
        url = parse_url(target) if isinstance(target, str) else target
    connect_args = {"application_name": APPLICATION_NAME, "connect_timeout": 10,
                    "options": f"-c lock_timeout={SESSION_LOCK_TIMEOUT_MS}"}
    connect_args.update(kwargs.pop("connect_args", {}))  # type: ignore[arg-type]
    return sa.create_engine(url, connect_args=connect_args, pool_pre_ping=False, **kwargs)


@contextmanager
def database_errors(target: Target | None = None) -> Iterator[None]:
    """Turn driver errors that an operator can act on into one-line problems."""
    secrets = target.secrets if target else ()
    where = target.describe() if target else "the database"
    try:
        yield
    except OperationalError as exc:
        raise classify(exc, where, secrets) from exc
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) in _PRIVILEGE_STATES:
            raise classify(exc, where, secrets) from exc
        raise


_PRIVILEGE_STATES = {"42501", "25006"}


def classify(exc: DBAPIError, where: str, secrets: tuple[str, ...] = ()) -> ToolkitError:
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    first = redact(str(orig).strip().splitlines()[0] if str(orig).strip() else repr(orig), secrets)
    if sqlstate == "42501":
        return DatabaseProblem(
            f"Permission denied on {where}: {first}",
            "run as the GitLab database owner (the role that runs GitLab's migrations)",
        )
    if sqlstate == "25006":
        return DatabaseProblem(
            f"{where} is read-only (a replica or a read-only session): {first}",
            "point --database-url at the primary",
        )
    if "password authentication failed" in first or sqlstate == "28P01":
        return DatabaseProblem(
            f"Authentication failed for {where}", "check the user and password in the database URL"
        )
    if sqlstate == "3D000" or ("does not exist" in first and "database" in first):
        return DatabaseProblem(f"Database not found: {first}", "check the database name in the URL")
    if sqlstate == "55P03":
        return LockUnavailable(
            f"A lock on {where} could not be had in time: {first}",
            "another session holds a conflicting lock (pg_locks shows it); try again when it is gone",
        )
    if sqlstate and not sqlstate.startswith("08"):
        return DatabaseProblem(
            f"The database refused a statement ({sqlstate}): {first}",
            "nothing of the failing transaction was kept; `toolkit history` shows the run. "
            "Report this message if it is not about your data",
        )
    return DatabaseProblem(
        f"Cannot use {where}: {first}",
        "check that the server is up and reachable, and the URL (host, port, user, database)",
    )


def server_version(conn: Connection) -> int:
    return int(conn.execute(sa.text("SHOW server_version_num")).scalar_one())
