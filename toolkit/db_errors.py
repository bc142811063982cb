"""What the database's errors mean to an operator: one line each, and what to do next.

The connection layer (``db.py``) hands out engines; this module reads what comes back
when something fails: a session the server ended (:func:`session_lost`), a server out of
disk, memory or connections (:func:`resource_exhausted`), a connection never made
(:func:`cannot_connect`), and everything else an operator can act on (:func:`classify`),
the password always masked.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from toolkit.conninfo import os_user_refused, parameter_refused, passfile_ignored, refused_for_good
from toolkit.errors import (
    DatabaseProblem,
    LockUnavailable,
    PreconditionRefused,
    ResourceExhausted,
    SessionLost,
    ToolkitError,
    redact,
)
from toolkit.pooling import pooler_refusal

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
    """The one-line problem for a driver error: the pooler's own words first, then a login
    refused, a server out of a resource, the toolkit's schema gone, a lost session, and
    what the SQLSTATE says; the password never shown."""
    if (refusal := pooler_refusal(exc)) is not None:
        return refusal  # the pooler's own words, named as such
    first = first_line(exc, secrets)
    if (refused := parameter_refused(first)) is not None:
        return refused  # a usage error (exit 2) naming the parameter, and its PG* variable
    if (login := _login_refused(first, where)) is not None:
        return login
    if (exhausted := resource_exhausted(exc, where, secrets)) is not None:
        return exhausted  # before "cannot connect": out of connections is refused at connect
    sqlstate = getattr(exc.orig, "sqlstate", None)
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
    if (statement := _statement_refused(sqlstate, first, where)) is not None:
        return statement
    if "password authentication failed" in first or sqlstate == "28P01":
        return DatabaseProblem(
            f"Authentication failed for {where}",
            "check the user and password in the database URL (or PGPASSWORD, or ~/.pgpass)")
    if sqlstate == "3D000" or ("does not exist" in first and "database" in first):
        return DatabaseProblem(f"Database not found: {first}", "check the database name in the URL")
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


def _login_refused(first: str, where: str) -> DatabaseProblem | None:
    """A login the server refused for want of a password, or for the operating-system user."""
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
    return None


def _statement_refused(sqlstate: str | None, first: str, where: str) -> ToolkitError | None:
    """A statement the server would not run here: read-only, too long, or a lock not had."""
    if sqlstate == "25006":
        return DatabaseProblem(
            f"{where} is read-only (a replica or a read-only session): {first}",
            "point --database-url at the primary",
        )
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
    return None


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
