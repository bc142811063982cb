"""A role-level statement_timeout shorter than the toolkit's longest read does not break it.

GitLab.com gives its database role a statement_timeout of 15 s; a fingerprint of a large
database reads longer than that. The toolkit's reads (plan, verify, fingerprint, status,
migrate's closing verify, rollback's checks) set their own statement_timeout in every
transaction (TOOLKIT_READ_TIMEOUT_S, default 600 s), so the role's does not apply to them.

At the gitlab-com scale a fingerprint's longest statement (a content digest) takes a few
hundred milliseconds here. The test measures it and sets the role's statement_timeout to a
fifth of it, at most 100 ms, with ``ALTER ROLE CURRENT_USER IN DATABASE <the test's
database>`` (no other test's database is affected; reset afterwards). Then it runs plan,
status, fingerprint, the milestones forwards with their closing verify and a verify each,
and back, all under that setting; and after each command, as a control, its longest read
runs again on a plain session (which sets nothing, so the role's setting applies) and must
be cancelled with 57014: the command would have failed had it not set its own.
Plan's and status's reads are shorter than the role's timeout at this scale: they are
shown to pass, not to need it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from helpers import TALLY, resolve_m1_anomalies, toolkit, toolkit_json, toolkit_process

from toolkit.db import READ_TIMEOUT_ENV
from toolkit.errors import ExitCode

MILESTONES = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")
SCALE = "realistic:gitlab-com"
# The role's timeout: far above what the statements no transaction of the toolkit's covers
# take (connecting, the pool's ping, the runner lock's session: well under a millisecond
# each), far below the reads of the commands below. Milestone 1's proof reads only the
# packages (its runs never write anything else: engine/writes.py), a few milliseconds at
# this scale, so its commands are not among those shown to need their own timeout; nor is
# `verify milestone-3`, which hashes none of the tables milestone 3 changes on purpose
# again and reads only the experiments' MLflow parts (4,000 rows here).
ROLE_MS = 25
NEED_THEIR_OWN = ["fingerprint --out"] + [f"{verb} {m}" for m in MILESTONES[1:] for verb in ("migrate", "verify")
                                          if (verb, m) != ("verify", "milestone-3")]
NEED_THEIR_OWN += [f"rollback {m}" for m in reversed(MILESTONES[1:])]


@dataclass
class Statement:
    ms: float
    sql: str
    params: object


@contextmanager
def _statements() -> Iterator[list[Statement]]:
    """Every statement any engine of this process runs meanwhile, with its duration."""
    seen: list[Statement] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        conn.info["tk_test_started"] = time.perf_counter()

    def after(conn, cursor, statement, parameters, context, executemany):
        took = (time.perf_counter() - conn.info.pop("tk_test_started")) * 1000
        seen.append(Statement(took, statement, parameters))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", before)
    sa.event.listen(sa.engine.Engine, "after_cursor_execute", after)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", before)
        sa.event.remove(sa.engine.Engine, "after_cursor_execute", after)


READ = ("SELECT", "WITH", "SHOW")
WRITE = ("INSERT ", "UPDATE ", "DELETE ", "CREATE ", "ALTER ", "DROP ")


def _is_read(statement: Statement) -> bool:
    sql = " ".join(statement.sql.split()).upper()
    return sql.startswith(READ) and not any(word in sql for word in WRITE)


def _run(db, *args: str) -> tuple[dict, Statement]:
    """A command in --json mode that must succeed: its document and its longest read statement."""
    doc, reads = _run_reads(db, *args)
    return doc, reads[0]


def _run_reads(db, *args: str) -> tuple[dict, list[Statement]]:
    """A command in --json mode that must succeed: its document and its reads, longest first."""
    with _statements() as seen:
        code, doc = toolkit_json(db, *args)
    assert code == 0, (args, doc)
    return doc, sorted((s for s in seen if _is_read(s)), key=lambda s: s.ms, reverse=True)


def _cancelled_on_a_plain_session(db, statement: Statement) -> bool | None:
    """Whether ``statement`` fails with 57014 on a session that sets nothing of its own (so
    the role's statement_timeout applies), run READ ONLY so it can change nothing. None
    when it no longer runs at all (it read a column or table the command then dropped)."""
    with psycopg.connect(db.url_text) as conn:
        conn.execute("BEGIN READ ONLY")
        try:
            conn.execute(statement.sql, statement.params)
        except psycopg.errors.QueryCanceled as exc:
            return exc.sqlstate == "57014"
        except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable):
            return None
        finally:
            conn.rollback()
    return False


@contextmanager
def _role_statement_timeout(db, ms: int) -> Iterator[None]:
    """The test's role gets ``statement_timeout`` in the test's database only (new sessions)."""
    db.execute(f'ALTER ROLE CURRENT_USER IN DATABASE "{db.name}" SET statement_timeout = \'{ms}ms\'')
    try:
        yield
    finally:
        db.execute(f'ALTER ROLE CURRENT_USER IN DATABASE "{db.name}" RESET statement_timeout')


def _session_timeout(db) -> str:
    """statement_timeout on a new session that sets nothing of its own."""
    with psycopg.connect(db.url_text, autocommit=True) as conn:
        return conn.execute("SHOW statement_timeout").fetchone()[0]


def _states(db) -> dict[str, str]:
    code, doc = toolkit_json(db, "status")
    assert code == 0, doc
    return {m["milestone"]: m["state"] for m in doc["result"]["milestones"]}



@pytest.mark.slow
def test_reads_migrate_and_rollback_succeed_under_a_role_statement_timeout_shorter_than_their_reads(
        make_database, tmp_path: Path):
    db = make_database(SCALE)
    resolve_m1_anomalies(db)
    _run(db, "fingerprint")  # warm the cache: what is measured is a warm read
    _, longest = _run(db, "fingerprint")
    role_ms = ROLE_MS
    assert longest.ms > 3 * role_ms, f"the data is too small: the longest read took {longest.ms:.0f} ms"

    # Every command below must succeed under the role's setting. After each, its longest
    # read runs again on a plain session: where that is cancelled (57014), the command
    # would have failed had it not set its own statement_timeout.
    needed_it: list[str] = []

    def run(*args: str) -> dict:
        doc, reads = _run_reads(db, *args)
        # a read of its, longer than the role's limit, that a plain session still cancels
        # (milestone 4 drops what it first read; a read measured just over the limit may
        # run just under it the second time, so the next one is tried)
        for statement in (s for s in reads if s.ms > role_ms):
            if _cancelled_on_a_plain_session(db, statement):
                needed_it.append(" ".join(args[:2]))
                break
        TALLY["commands run under a role statement_timeout shorter than their reads"] += 1
        return doc

    before = tmp_path / "before.json"
    with _role_statement_timeout(db, role_ms):
        assert _session_timeout(db) == f"{role_ms}ms"
        run("plan")
        run("status")
        run("fingerprint", "--out", str(before))
        for milestone in MILESTONES:
            doc = run("migrate", milestone, "--yes")
            assert doc["result"]["verify"]["ok"], (milestone, doc["result"]["verify"])
            _recorded(db, "migrate", milestone, doc)
            run("verify", milestone)
        assert set(_states(db).values()) == {"verified"}
        for milestone in reversed(MILESTONES):
            doc = run("rollback", milestone)
            _recorded(db, "rollback", milestone, doc)
        assert set(_states(db).values()) == {"rolled_back"}
        # the data is back as it was, by the toolkit's own longest read
        back = toolkit(db, "fingerprint", "--compare", str(before))
        assert back.exit_code == 0, back.output
        assert _session_timeout(db) == f"{role_ms}ms"  # in force all along
    assert _session_timeout(db) == "0"

    assert set(NEED_THEIR_OWN) <= set(needed_it), (f"role statement_timeout {role_ms} ms", needed_it)
    TALLY["reads shown to exceed a role's statement_timeout on a plain session"] += len(needed_it)


def _recorded(db, verb: str, milestone: str, doc: dict) -> None:
    """History says the run succeeded, with the rows the command reported."""
    code, history = toolkit_json(db, "history", "--limit", "1")
    assert code == 0, history
    run = history["result"]["runs"][0]
    assert run["command"].split()[:3] == ["toolkit", verb, milestone], run
    assert run["outcome"] == "succeeded" and run["error"] is None, run
    assert sum((run["rows_by_step"] or {}).values()) == doc["result"]["rows"], (run, doc["result"]["rows"])


@pytest.mark.slow
def test_a_read_timeout_shorter_than_a_read_ends_it_with_one_line(make_database):
    """TOOLKIT_READ_TIMEOUT_S is real: set to 1 ms, fingerprint, verify and plan stop with
    exit code 4 and one line naming the statement timeout, and no traceback."""
    db = make_database(SCALE)
    resolve_m1_anomalies(db)
    for args in (("fingerprint",), ("verify", "milestone-1"), ("plan", "milestone-1")):
        result = toolkit_process(db, *args, env={READ_TIMEOUT_ENV: "0.001"})
        assert result.returncode == ExitCode.LOCKED, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        said = [line for line in result.stderr.strip().splitlines() if not line.startswith("Using the database")]
        assert len(errors) == 1 and errors == said, result.stderr
        assert "statement_timeout" in errors[0] and "canceling statement due to statement timeout" in errors[0]
        TALLY["reads stopped by a tiny TOOLKIT_READ_TIMEOUT_S"] += 1
    # the same reads with the default read timeout succeed
    for args in (("fingerprint",), ("plan", "milestone-1")):
        assert toolkit_process(db, *args).returncode == 0, args
    # and a value that is not a number of seconds is a usage error
    bad = toolkit_process(db, "fingerprint", env={READ_TIMEOUT_ENV: "ten"})
    assert bad.returncode == ExitCode.USAGE, bad.stderr
    assert f"{READ_TIMEOUT_ENV}='ten' is not a number of seconds" in bad.stderr and "Traceback" not in bad.stderr
