"""Which database a command talks to, and how: URL resolution, masking, engine, errors.

Order of precedence: the command line first (``--database-url``, then ``--gitlab-config``,
GitLab's database.yml), then the environment (``TOOLKIT_DATABASE_URL``, then libpq's own:
PGHOST, PGDATABASE, PGSERVICE, ...: what psql would use), then the running sandbox; every
command says in one line which one it used (:meth:`Target.announcement`), so nobody
mistakes the sandbox for production. The password never leaves this module unmasked: :func:`describe` is what
every message uses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from toolkit.cancel import track
from toolkit.conninfo import refused_for_good
from toolkit.conninfo import render as render_url
from toolkit.conninfo import to_url as conninfo_to_url
from toolkit.errors import (
    DatabaseProblem,
    LockUnavailable,
    PreconditionRefused,
    ResourceExhausted,
    SessionLost,
    ToolkitError,
    UsageProblem,
    redact,
)

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


@dataclass(frozen=True)
class Target:
    url: URL
    source: str  # "option", "environment", "libpq", "gitlab-config" or "sandbox"
    origin: str = ""  # where, for the one line every command says: "libpq's environment (PGHOST)"
    note: str = ""  # a source given but not used, and why

    @property
    def secrets(self) -> tuple[str, ...]:
        from toolkit.conninfo import SECRET_PARAMETERS

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


class NoDatabaseGiven(PreconditionRefused):
    """No source names a database and the sandbox is not running. ``toolkit sql`` can do
    without one (it shows the query instead), so it is told apart from other refusals."""


def resolve_target(url_option: str | None, gitlab_config: str | None = None) -> Target:
    """The database, from the first source given, in this order:

    ``--database-url``, ``--gitlab-config`` (GitLab's database.yml), ``TOOLKIT_DATABASE_URL``,
    libpq's own environment (when one of PGHOST, PGHOSTADDR, PGPORT, PGDATABASE, PGUSER,
    PGSERVICE is set: what psql would use, service file and password file included), then
    the running sandbox. What is given on the command line wins over the environment: a
    stray PGHOST left in a shell must not redirect an explicit ``--gitlab-config``. A source
    given but overridden is named in the target's note, so the line every command says
    tells the operator.
    """
    from toolkit.conninfo import from_libpq_environment

    ignored = f"--gitlab-config {gitlab_config} not read" if gitlab_config else ""
    # An option given empty (`--database-url "$UNSET"`) is refused as empty, never skipped
    # for the next source, which could be another database.
    if url_option is not None:
        return Target(parse_url(url_option), "option",
                      note=ignored and f"{ignored}: --database-url comes first")
    if gitlab_config is not None:
        from toolkit import gitlab_config as gitlab

        found = gitlab.read(gitlab_config)
        return Target(found.url, "gitlab-config", found.origin(), note=_environment_not_used(found.url))
    if raw := os.environ.get(DATABASE_URL_ENV):
        return Target(parse_url(raw), "environment")
    if libpq := from_libpq_environment():
        return Target(libpq.url, "libpq", libpq.origin())
    from toolkit.gitlab_config import OMNIBUS_PATH
    from toolkit.sandbox.server import SandboxServer

    status = SandboxServer().status()
    if not status.running:
        omnibus = (f" (this machine has {OMNIBUS_PATH}: --gitlab-config {OMNIBUS_PATH})"
                   if os.path.exists(OMNIBUS_PATH) else "")
        raise NoDatabaseGiven(
            "No database given and the sandbox is not running",
            f"pass --database-url, pass --gitlab-config PATH to GitLab's database.yml{omnibus}, "
            f"set {DATABASE_URL_ENV}, set libpq's PGHOST/PGDATABASE/PGUSER or PGSERVICE, "
            "or run `toolkit sandbox start`",
        )
    return Target(parse_url(status.url()), "sandbox")


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
        lock_ms, statement_ms = options.get(TIMEOUTS_OPTION, defaults)
        conn.exec_driver_sql(
            "SELECT set_config('lock_timeout', %(l)s, true), "
            "set_config('statement_timeout', %(s)s, true)",
            {"l": f"{defaults[0] if lock_ms is None else lock_ms}ms",
             "s": f"{defaults[1] if statement_ms is None else statement_ms}ms"})

    return engine


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


# The server ended the session or cannot serve it now: an interruption, not a refusal.
SESSION_ENDED_STATES = {
    "57P01": "the session was terminated (pg_terminate_backend, or a fast shutdown)",
    "57P02": "the server crashed or was stopped in immediate mode",
    "57P03": "the server cannot accept connections yet (starting up, or recovering)",
    "57P05": "the session was idle longer than idle_session_timeout",
}
# Only once a run has started writing on a primary (its preflight refuses a replica).
BECAME_READ_ONLY = "25006"


def session_lost(exc: BaseException, *, during_run: bool = False) -> str | None:
    """Why the database side went away, when it did; None for any other error."""
    if not isinstance(exc, DBAPIError):
        return None
    code = getattr(exc.orig, "sqlstate", None) or ""
    if during_run and code == BECAME_READ_ONLY:
        return "the server became read-only (a failover or switchover?)"
    if code in SESSION_ENDED_STATES:
        return SESSION_ENDED_STATES[code]
    if code.startswith("08") or (exc.connection_invalidated and not code):
        return "the connection was lost"
    return None


# Class 53, insufficient resources: what ran out, and what the operator frees before running
# the same command again. PostgreSQL rolled the failing transaction back; nothing else is lost.
RESOURCE_STATES = {
    "53000": ("the database server ran out of a resource",
              "free what the server's message names"),
    "53100": ("the database server's disk is full",
              "free disk space on the database server where the message says (its data directory, "
              "a tablespace, pg_wal, or the temporary files' directory)"),
    "53200": ("the database server ran out of memory",
              "free memory on the database server (fewer sessions, a lower work_mem), or a smaller "
              "--batch-size"),
    "53300": ("the database server has no connection left for the toolkit",
              "free connections (pg_stat_activity shows who holds them; max_connections, and the "
              "role's or the database's CONNECTION LIMIT, set how many there are)"),
    "53400": ("the database server refused to go past one of its configured limits",
              "free what the limit counts, or raise the limit the message names (temp_file_limit, "
              "max_locks_per_transaction ...)"),
}
# A refused connection carries no SQLSTATE in the client: the server's words tell these.
_OUT_OF_CONNECTIONS = ("too many clients already", "too many connections for",
                       "remaining connection slots are reserved")
# The server itself crashed (a PANIC restarts it: pg_wal full is the common cause) or is
# recovering from one: the operator may have space to free before it comes back.
CRASH_STATES = {"57P02", "57P03"}
CRASH_NEXT = ("if the server's log says it ran out of space (PANIC … No space left on device, "
              "often pg_wal), free disk space on the database server first; ")


def resource_state(exc: BaseException) -> str | None:
    """The class 53 SQLSTATE (insufficient resources) of a driver error, when it is one."""
    if not isinstance(exc, DBAPIError):
        return None
    code = getattr(exc.orig, "sqlstate", None) or ""
    if code.startswith("53"):
        return code
    if not code and any(words in str(exc.orig) for words in _OUT_OF_CONNECTIONS):
        return "53300"
    return None


def resource_exhausted(exc: DBAPIError, where: str,
                       secrets: tuple[str, ...] = ()) -> ResourceExhausted | None:
    """The one-line stop for a server out of disk, memory, connections or a configured
    limit: what ran out, that everything committed is kept, what to free, and to run the
    same command again. None for any other error."""
    code = resource_state(exc)
    if code is None:
        return None
    what, free = RESOURCE_STATES.get(code, RESOURCE_STATES["53000"])
    return ResourceExhausted(
        f"Stopped: {what} ({code}: {first_line(exc, secrets)}) on {where}",
        f"everything committed before it is kept (the failing transaction was rolled back); "
        f"{free}, then run the same command again",
        details={"sqlstate": code})


def first_line(exc: DBAPIError, secrets: tuple[str, ...] = ()) -> str:
    orig = exc.orig
    return redact(str(orig).strip().splitlines()[0] if str(orig).strip() else repr(orig), secrets)


def lost_session_error(exc: DBAPIError, why: str, where: str,
                       secrets: tuple[str, ...] = ()) -> SessionLost:
    crashed = (getattr(exc.orig, "sqlstate", None) or "") in CRASH_STATES
    return SessionLost(
        f"Interrupted: {why} ({first_line(exc, secrets)}) on {where}",
        "everything committed before it is kept (a migrate or rollback keeps every batch up to "
        f"the last one committed); {CRASH_NEXT if crashed else ''}run the same command again to "
        "resume, or add --reconnect N to let it resume by itself")


def classify(exc: DBAPIError, where: str, secrets: tuple[str, ...] = ()) -> ToolkitError:
    from toolkit.conninfo import os_user_refused, parameter_refused, passfile_ignored
    from toolkit.engine.pooling import pooler_refusal  # the pooler's own words, named as such

    if (refusal := pooler_refusal(exc)) is not None:
        return refusal
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    first = first_line(exc, secrets)
    if (refused := parameter_refused(first)) is not None:
        return refused  # a usage error (exit 2) naming the parameter, and its PG* variable
    if "no password supplied" in first:
        return DatabaseProblem(
            f"{where} asks for a password and none was given",
            "give it in the URL (after the user name, as user:PASSWORD@host; in a keyword string, "
            "as the password parameter), in the PGPASSWORD environment variable, or in ~/.pgpass "
            "as a line HOST:PORT:DATABASE:USER:PASSWORD (chmod 600; PGPASSFILE names another file)"
            + passfile_ignored())
    if match := os_user_refused(first):
        return DatabaseProblem(
            f"{match[0]} authentication failed for user {match[1]!r} on {where}: the server lets that "
            "role in over this connection only for the operating-system user of the same name (or "
            "the one pg_ident.conf maps to it)",
            "run the toolkit as that operating-system user (GitLab Omnibus: sudo -u git -H toolkit "
            "...), or connect as a role with a password (over TCP, or where pg_hba.conf asks for one)")
    if (exhausted := resource_exhausted(exc, where, secrets)) is not None:
        return exhausted  # before "cannot connect": out of connections is refused at connect
    if sqlstate in ("42P01", "3F000") and ('"toolkit.' in first or 'schema "toolkit"' in first):
        return PreconditionRefused(
            f"The toolkit's own schema, or a table of it, is gone ({first}) on {where}: what the "
            "batch under way did was rolled back, and the toolkit's record of what it changed "
            "went with the schema",
            "`toolkit status` says what GitLab's tables show in place; restore the toolkit schema "
            "from a backup, or declare the state with `toolkit adopt --yes`")
    if sqlstate == "42501":
        return DatabaseProblem(
            f"Permission denied on {where}: {first}",
            "run as the GitLab database owner (the role that runs GitLab's migrations)",
        )
    if (why := session_lost(exc)) and not cannot_connect(exc):
        return lost_session_error(exc, why, where, secrets)
    if sqlstate == "25006":
        return DatabaseProblem(
            f"{where} is read-only (a replica or a read-only session): {first}",
            "point --database-url at the primary",
        )
    if "password authentication failed" in first or sqlstate == "28P01":
        return DatabaseProblem(
            f"Authentication failed for {where}",
            "check the user and password in the database URL (or PGPASSWORD, or ~/.pgpass)")
    if sqlstate == "3D000" or ("does not exist" in first and "database" in first):
        return DatabaseProblem(f"Database not found: {first}", "check the database name in the URL")
    if sqlstate == "57014":
        return LockUnavailable(
            f"A statement ran longer than its statement_timeout on {where}: {first}",
            "for a read (plan, verify, fingerprint) raise --read-timeout; for a batch, "
            "--statement-timeout-ms or a smaller --batch-size; nothing of that statement was kept",
        )
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


def cannot_connect(exc: BaseException) -> bool:
    """A failure to connect at all (server down, wrong host) says so plainly instead."""
    if not isinstance(exc, DBAPIError):
        return False
    text = str(exc.orig)
    if refused_for_good(text):  # a missing password or a bad parameter: no retry fixes it
        return False
    # libpq's words for a connection that was never made (psycopg 3.3 says "connection is
    # bad: … No such file or directory" for a Unix socket whose server is down).
    return any(words in text for words in _NEVER_CONNECTED)


_NEVER_CONNECTED = ("connection failed", "could not connect", "Connection refused", "connection is bad",
                    "No such file or directory", "timeout expired")


def server_version(conn: Connection) -> int:
    return int(conn.execute(sa.text("SHOW server_version_num")).scalar_one())
