"""How one inventory entry reaches its database, through the sources the toolkit reads.

Two forms of the same answer: a :class:`~toolkit.db.Target` for reads made in this
process (``fleet plan``, several databases at once, so nothing here may go through the
process's environment), and the environment and options of the ``toolkit`` command a job runs (``fleet job``),
which then resolves the database exactly as a single-database command does and says so
in its first line.
"""

from __future__ import annotations

import os

from toolkit import gitlab_config
from toolkit.conninfo import LIBPQ_LOCATION_VARIABLES
from toolkit.db import DATABASE_URL_ENV, Target, parse_url
from toolkit.errors import UsageProblem
from toolkit.fleet.inventory import Database


def target(database: Database) -> Target:
    """The database's target; a variable that is not set is a usage error naming it."""
    if database.source == "url_env":
        raw = _url_from(database, os.environ)
        return Target(parse_url(raw), "environment", origin=f"${database.value}")
    if database.source == "service":
        # libpq reads the service file (PGSERVICEFILE, ~/.pg_service.conf) when it connects.
        return Target(parse_url(f"service={database.value}"), "libpq",
                      origin=f"libpq service {database.value}")
    found = gitlab_config.read(database.value)
    return Target(found.url, "gitlab-config", found.origin())


def _url_from(database: Database, environ: object) -> str:
    raw = environ.get(database.value)  # type: ignore[attr-defined]
    if not raw:
        raise UsageProblem(f"database {database.name}: ${database.value} is not set (or empty)",
                           f"set {database.value} to the database's URL (a masked CI/CD variable "
                           "in GitLab)")
    return raw


def run_environment(database: Database, environ: dict[str, str] | None = None
                      ) -> tuple[dict[str, str], list[str]]:
    """The environment and global options of a ``toolkit`` command run on ``database``.

    Every other source the toolkit would read first is removed, so the run cannot reach
    a database other than the one named (a job's environment may hold PGHOST for
    something else).
    """
    env = dict(os.environ if environ is None else environ)
    for name in (DATABASE_URL_ENV, *LIBPQ_LOCATION_VARIABLES):
        env.pop(name, None)
    if database.source == "url_env":
        raw = _url_from(database, os.environ if environ is None else environ)
        env[DATABASE_URL_ENV] = raw
        return env, []
    if database.source == "service":
        env["PGSERVICE"] = database.value
        return env, []
    return env, ["--gitlab-config", database.value]
