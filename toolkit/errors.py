"""Exceptions that carry an exit code and the operator's next step.

Every expected failure is raised as a :class:`ToolkitError`; the CLI turns it into one
line (problem, then what to do) and the exit code below, without a traceback. Keeping the
codes here, in one table, is what lets docs/output.md document them and CI rely on them.
"""

from __future__ import annotations

import re
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    VERIFY_FAILED = 1
    USAGE = 2
    REFUSED = 3
    LOCKED = 4
    DATABASE = 5
    THROTTLED = 6
    BUSY = 7  # another toolkit run holds the runner: nothing was done, try again later
    INTERNAL = 70
    SESSION_LOST = 75  # sysexits' EX_TEMPFAIL: try again
    INTERRUPTED = 130
    PIPE_CLOSED = 141  # 128 + SIGPIPE, as a shell reports a program a closed pipe ended


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.VERIFY_FAILED: "a verification failed (the database is not in the state checked for), "
                            "or `plan --fail-on-blocking` found a BLOCKING anomaly",
    ExitCode.USAGE: "usage error (unknown option, bad value)",
    ExitCode.REFUSED: "refused: a precondition does not hold; nothing was changed",
    ExitCode.LOCKED: "a lock could not be had or a statement timed out; the current batch was rolled back",
    ExitCode.DATABASE: "the database could not be reached or used (connection, authentication, privileges)",
    ExitCode.THROTTLED: "stopped at a batch boundary after waiting --max-throttle-s for the database's "
                        "health (replica lag, VACUUM, a long transaction, archiving, your throttle), "
                        "or on `toolkit control abort`; everything committed is kept: run the same "
                        "command again to resume",
    ExitCode.BUSY: "busy: another toolkit run holds the runner lock on this database (or a "
                   "session of an earlier run is still at work there); nothing was done: run the "
                   "same command again when it has finished",
    ExitCode.INTERNAL: "an unexpected internal error (a bug: please report it with TOOLKIT_DEBUG=1 output)",
    ExitCode.SESSION_LOST: "the database ended the session, ran out of a resource (disk, memory, "
                           "connections, a configured limit) or the run lost its hold on the runner "
                           "lock (restart, crash, failover, terminated session, lost connection); "
                           "everything committed is kept: free what the message names, then run the "
                           "same command again, or pass --reconnect N",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C or signal); progress up to the last batch is kept",
    ExitCode.PIPE_CLOSED: "the reader of the output went away (`| head`) before the command "
                          "finished writing; nothing more was said",
}


class ToolkitError(Exception):
    """An expected failure: what went wrong and what the operator should do next."""

    exit_code: ExitCode = ExitCode.REFUSED

    def __init__(self, problem: str, next_step: str | None = None, *, details: object = None):
        super().__init__(problem)
        self.problem = problem
        self.next_step = next_step
        self.details = details

    def one_line(self) -> str:
        """One line, its whitespace collapsed as history stores it (a server's message can
        carry two spaces or a newline), so what the operator read is what history says."""
        text = f"{self.problem.rstrip('.')}. Next: {self.next_step}" if self.next_step else self.problem
        return " ".join(text.split())


class UsageProblem(ToolkitError):
    exit_code = ExitCode.USAGE


class PreconditionRefused(ToolkitError):
    exit_code = ExitCode.REFUSED


class SandboxBusy(ToolkitError):
    """Another toolkit run holds the sandbox (see :mod:`toolkit.sandbox.lock`): nothing was
    changed; the same command succeeds once that run has ended. "Busy", as a second runner
    on a database is (exit 7), so a script retries both the same way."""

    exit_code = ExitCode.BUSY


class VerificationFailed(ToolkitError):
    exit_code = ExitCode.VERIFY_FAILED


class SandboxReplaced(VerificationFailed):
    """The sandbox database a demo checked was dropped and created again under it: what
    it checked afterwards was another database, so none of its checks can be said to hold."""


class LockUnavailable(ToolkitError):
    exit_code = ExitCode.LOCKED


class RunnerBusy(LockUnavailable):
    """Another toolkit run holds the runner: "busy, try again later", which CI must tell
    apart from a batch's lock or statement timeout (exit 4). Nothing of this run started."""

    exit_code = ExitCode.BUSY


class DatabaseProblem(ToolkitError):
    exit_code = ExitCode.DATABASE


class SessionLost(ToolkitError):
    """The database side went away (or took the runner's hold with it): not an error in the
    data, an interruption that the same command resumes from."""

    exit_code = ExitCode.SESSION_LOST


class ResourceExhausted(ToolkitError):
    """The server ran out of something (disk, memory, connections, a configured limit):
    nothing is wrong with the data and the failing transaction was rolled back, so it is a
    stop the same command resumes from once the operator has freed what ran out. Not a
    :class:`SessionLost`: ``--reconnect`` does not retry it, since trying again before anyone
    freed anything would only fail again."""

    exit_code = ExitCode.SESSION_LOST


class Throttled(ToolkitError):
    """The run waited its maximum (--max-throttle-s) for the database's health and stopped
    at a batch boundary: nothing is half-done, the same command resumes."""

    exit_code = ExitCode.THROTTLED


class Aborted(ToolkitError):
    """``toolkit control abort`` stopped the run at a batch boundary: nothing is half-done,
    the same command resumes. The throttled run's code, which says exactly that."""

    exit_code = ExitCode.THROTTLED


class Interrupted(ToolkitError):
    exit_code = ExitCode.INTERRUPTED


_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)", re.I)
_PASSWORD_PARAM = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'[^']*'|\S+)", re.I)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Mask passwords in URLs, in ``password=...`` fragments and any known secret."""
    text = _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***{m['tail']}" if m["pw"] else m[0], text)
    text = _PASSWORD_PARAM.sub(lambda m: f"{m['head']}***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


_DATABASE_URL = re.compile(r"\bpostgres(?:ql)?(?:\+\w+)?://(?:[^\s,;)'\"]*[^\s,;)'\".:])?", re.I)


def without_database_urls(text: str) -> str:
    """A database's URL, even masked, names its host, user and database: history rows are
    read by whoever can read the toolkit's schema and copied into reports, so they say
    "the database" instead."""
    return _DATABASE_URL.sub("the database", text)


# SQLAlchemy appends "\n[SQL: stmt]\n[parameters: ...]\n(Background on this error at: url)";
# each part ends where the next begins, at a line's end or at the end of the text.
_END = r"(?=\s*(?:\[parameters: |\(Background on this error at: |\n|$|\.\s))"
_DRIVER_DUMP = re.compile(rf"\s*(?:\[SQL: .*?\]{_END}|\[parameters: .*?\]{_END}"
                          r"|\(Background on this error at: [^)\s]*\)"
                          r"|\n\s*LINE \d+: [^\n]*\n\s*\^)", re.S)  # LINE: the server's pointer
_DRIVER_PREFIX = re.compile(r"\((?:sqlalchemy|psycopg)[\w.]*\)\s*")


def without_driver_internals(text: str) -> str:
    """SQLAlchemy's text of an error as one line of what went wrong: without the statement
    dump (``[SQL: ...]``), its parameters, the ``Background on this error at:`` link, the
    server's ``LINE 1: ... ^`` pointer into the statement or the ``(sqlalchemy.exc.X)``
    prefix. Whatever path stored it (a driver error, an error that wraps one, a message
    quoting one), history keeps the problem, not the internals, which repeat the
    statement's data and are no use to the operator who reads it."""
    text = _DRIVER_DUMP.sub("", text)
    text = _DRIVER_PREFIX.sub("", text)
    return " ".join(text.split())
