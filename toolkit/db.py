"""Which database a command talks to, and how: URL resolution, masking, the engine and
each transaction's timeouts (what the errors mean: ``db_errors.py``).

Order of precedence: the command line first (``--database-url``, then ``--gitlab-config``,
GitLab's database.yml), then the environment (``TOOLKIT_DATABASE_URL``, then libpq's own:
PGHOST, PGDATABASE, PGSERVICE, ...: what psql would use), then the running sandbox (the
command line's fallback, cli/context.py); every command says in one line which one it
used (:meth:`Target.announcement`), so nobody mistakes the sandbox for production. The
password never leaves this module unmasked: :meth:`Target.describe` is what every message
uses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine

from toolkit import gitlab_config as gitlab
from toolkit.cancel import track
from toolkit.conninfo import SECRET_PARAMETERS, from_libpq_environment
from toolkit.conninfo import render as render_url
from toolkit.conninfo import to_url as conninfo_to_url
from toolkit.errors import UsageProblem

DATABASE_URL_ENV = "TOOLKIT_DATABASE_URL"
READ_TIMEOUT_ENV = "TOOLKIT_READ_TIMEOUT_S"
APPLICATION_NAME = "toolkit"
# A pooled connection's info key: the application_name its session was last given by a
# set_config (a run's token name, engine/lease.py; the runner lock's label, engine/locks.py).
SESSION_NAME_KEY = "toolkit_application_name"
# Every transaction of the toolkit waits at most this long for a lock (batches set their
# own, shorter, limit): a read must fail clearly rather than queue behind an ACCESS EXCLUSIVE lock.
DEFAULT_LOCK_TIMEOUT_MS = 5000
# Every transaction's statement_timeout unless it sets its own (batches, schema changes):
# long enough for a fingerprint of a large database, and never the role's own setting
# (GitLab.com gives its role 15 s), which would cut verify off after the work was committed.
DEFAULT_READ_TIMEOUT_S = 600
# A connection option carrying each of its transactions' (lock_timeout, statement_timeout)
# in ms; None keeps the default for that one.
TIMEOUTS_OPTION = "toolkit_timeouts"
# A connection option: each of its transactions begins with SET TRANSACTION ISOLATION LEVEL
# REPEATABLE READ, READ ONLY as its very first statement (before the timeouts), so the
# server itself refuses any write. Unlike SQLAlchemy's postgresql_readonly, which sets a
# characteristic of the pooled driver connection, it lives on this Connection object only.
READ_ONLY_OPTION = "toolkit_read_only"
# A connection option, set while a transaction begins that sets its own timeouts as its
# first statement (a fenced batch, engine/fenced.py): the begin hook leaves them to it.
OWN_TIMEOUTS = "toolkit_own_timeouts"


@dataclass(frozen=True)
class Target:
    url: URL
    source: str  # "option", "environment", "libpq", "gitlab-config" or "sandbox"
    origin: str = ""  # where, for the one line every command says: "libpq's environment (PGHOST)"
    note: str = ""  # a source given but not used, and why

    @property
    def secrets(self) -> tuple[str, ...]:
        found = [self.url.password, *(self.url.query.get(key) for key in SECRET_PARAMETERS)]
        return tuple(s for s in found if isinstance(s, str) and s)

    def describe(self) -> str:
        """The URL as libpq reads it, every host listed, the password masked."""
        return render_url(self.url)

    def announcement(self) -> str:
        """The one line every command that connects says first: which database, from where."""
        said = {
            "option": f"Using the database given by --database-url: {self.describe()}",
            "environment": f"Using the database in {DATABASE_URL_ENV}: {self.describe()}",
            "libpq": f"Using the database from {self.origin}: {self.describe()}",
            "gitlab-config": f"Using GitLab's database from {self.origin}: {self.describe()}",
        }.get(self.source, f"Using the sandbox database {self.describe()} (no --database-url, "
                           f"--gitlab-config, {DATABASE_URL_ENV} or PGHOST/PGDATABASE/PGSERVICE given)")
        return f"{said} ({self.note})" if self.note else said


def parse_url(raw: str) -> URL:
    """Accept every connection string libpq accepts, parsed by libpq itself.

    Several hosts (``postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write``),
    keyword/value conninfo, Unix socket directories, ``postgres://`` and libpq's query
    parameters (passed through to it); see :mod:`toolkit.conninfo`. Anything else is a
    one-line :class:`UsageProblem`, the password masked.
    """
    return conninfo_to_url(raw)


def resolve_target(url_option: str | None, gitlab_config: str | None = None) -> Target | None:
    """The database, from the first source given, in this order:

    ``--database-url``, ``--gitlab-config`` (GitLab's database.yml), ``TOOLKIT_DATABASE_URL``,
    libpq's own environment (when one of PGHOST, PGHOSTADDR, PGPORT, PGDATABASE, PGUSER,
    PGSERVICE is set: what psql would use, service file and password file included). None
    when no source names one: what to fall back to (the running sandbox) is the command
    line's decision (cli/context.py), not the connection layer's. What is given on the
    command line wins over the environment: a stray PGHOST left in a shell must not
    redirect an explicit ``--gitlab-config``. A source given but overridden is named in
    the target's note, so the line every command says tells the operator.
    """
    ignored = f"--gitlab-config {gitlab_config} not read" if gitlab_config else ""
    # An option given empty (`--database-url "$UNSET"`) is refused as empty, never skipped
    # for the next source, which could be another database.
    if url_option is not None:
        return Target(parse_url(url_option), "option",
                      note=ignored and f"{ignored}: --database-url comes first")
    if gitlab_config is not None:
        found = gitlab.read(gitlab_config)
        return Target(found.url, "gitlab-config", found.origin(), note=_environment_not_used(found.url))
    if raw := os.environ.get(DATABASE_URL_ENV):
        return Target(parse_url(raw), "environment")
    if libpq := from_libpq_environment():
        return Target(libpq.url, "libpq", libpq.origin())
    return None


# libpq's location variables and the parameter each one gives.
_LOCATION_PARAMETERS = {"PGHOST": "host", "PGHOSTADDR": "hostaddr", "PGPORT": "port",
                        "PGDATABASE": "dbname", "PGUSER": "user", "PGSERVICE": "service"}


def _environment_not_used(url: URL) -> str:
    """What a ``--gitlab-config`` says of the environment it wins over, truthfully: the
    variables whose parameter database.yml sets are not used; one whose parameter it
    leaves out libpq still reads when it connects (a file without ``host``: PGHOST)."""
    given = {"host": bool(url.host or url.query.get("host")), "port": bool(url.port or url.query.get("port")),
             "dbname": bool(url.database), "user": bool(url.username),
             "hostaddr": "hostaddr" in url.query, "service": "service" in url.query}
    set_ = [name for name in _LOCATION_PARAMETERS if os.environ.get(name)]
    unused = ([DATABASE_URL_ENV] if os.environ.get(DATABASE_URL_ENV) else []) + [
        name for name in set_ if given[_LOCATION_PARAMETERS[name]]]
    still = [name for name in set_ if not given[_LOCATION_PARAMETERS[name]]]
    said = []
    if unused:
        said.append(f"{', '.join(unused)} in the environment not used: --gitlab-config comes first")
    if still:
        said.append(f"libpq still reads {', '.join(still)} for what the file leaves out "
                    f"({', '.join(_LOCATION_PARAMETERS[name] for name in still)})")
    return "; ".join(said)


MAX_TIMEOUT_MS = 2**31 - 1  # PostgreSQL's integer settings (statement_timeout) stop here


def read_timeout_ms() -> int:
    """$TOOLKIT_READ_TIMEOUT_S in milliseconds, checked as --read-timeout is (cli/params.py):
    finite, within PostgreSQL's statement_timeout, and not under a millisecond (which would
    round to 0, PostgreSQL's "no timeout")."""
    raw = os.environ.get(READ_TIMEOUT_ENV)
    next_step = f"set {READ_TIMEOUT_ENV} to seconds, e.g. 600 (0 for none)"
    try:
        seconds = float(raw) if raw else DEFAULT_READ_TIMEOUT_S
    except ValueError:
        raise UsageProblem(f"{READ_TIMEOUT_ENV}={raw!r} is not a number of seconds", next_step) from None
    if not math.isfinite(seconds) or not 0 <= seconds * 1000 <= MAX_TIMEOUT_MS:
        raise UsageProblem(f"{READ_TIMEOUT_ENV}={raw!r} is not from 0 to {MAX_TIMEOUT_MS / 1000:,.3f} "
                           "seconds (PostgreSQL's largest statement_timeout)", next_step)
    if 0 < seconds < 0.001:
        raise UsageProblem(f"{READ_TIMEOUT_ENV}={raw!r} is less than a millisecond, which PostgreSQL "
                           "would take as no timeout at all", next_step)
    return int(seconds * 1000)


def create_engine(target: Target | URL | str, *, read_timeout: int | None = None,
                  **kwargs: object) -> Engine:
    """An engine whose sessions carry nothing that could outlive a transaction.

    No ``options`` startup parameter (PgBouncer refuses it) and no session-level SET: each
    transaction sets its own ``lock_timeout`` and ``statement_timeout`` with
    ``set_config(..., true)`` when it begins, so a pooled server connection handed on to
    GitLab keeps the server's defaults. No server-side prepared statements (psycopg's
    ``prepare_threshold``), which collide on a pooler's shared backends. ``pool_pre_ping``
    replaces a pooled connection that ``idle_session_timeout`` or a restart ended.
    """
    if isinstance(target, Target):
        url = target.url
    else:
        url = parse_url(target) if isinstance(target, str) else target
    # The URL's own application_name and connect_timeout win over the toolkit's defaults.
    connect_args: dict[str, object] = {key: value for key, value in (("application_name", APPLICATION_NAME),
                                                  ("connect_timeout", 10))
                    if key not in url.query}
    connect_args["prepare_threshold"] = None
    connect_args.update(cast("dict[str, object]", kwargs.pop("connect_args", {})))
    engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True, **kwargs)
    track(engine)  # a stop (Ctrl-C, SIGTERM) cancels the statement on the server: cancel.py
    statement_ms = read_timeout_ms() if read_timeout is None else read_timeout
    defaults = (DEFAULT_LOCK_TIMEOUT_MS, statement_ms)

    @event.listens_for(engine, "begin")
    def _transaction_timeouts(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # no transaction to scope a setting to; see engine.ddl for CONCURRENTLY
        if options.get(READ_ONLY_OPTION):
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if options.get(OWN_TIMEOUTS):
            return
        lock_ms, statement_ms = options.get(TIMEOUTS_OPTION, (None, None))
        set_timeouts(conn, defaults[0] if lock_ms is None else lock_ms,
                     defaults[1] if statement_ms is None else statement_ms)

    return engine


def set_timeouts(conn: Connection, lock_ms: int | None, statement_ms: int | None) -> None:
    """This transaction's own ``lock_timeout`` and ``statement_timeout``, in one statement
    (``set_config(..., true)``: they end with it, so a pooled session keeps its defaults).
    None leaves that one as the transaction began with it."""
    settings = {"lock_timeout": lock_ms, "statement_timeout": statement_ms}
    given = {name: f"{ms}ms" for name, ms in settings.items() if ms is not None}
    if given:
        conn.exec_driver_sql("SELECT " + ", ".join(f"set_config('{name}', %({name})s, true)"
                                                    for name in given), given)
