"""The toolkit through a real PgBouncer (``tests/pgbouncer.py``), in each pool mode.

- Transaction and statement pooling: ``migrate`` and ``rollback`` refuse (exit 3, naming
  PgBouncer and the fix) before anything is written, and leave no setting and no advisory
  lock behind on any of the pool's server backends. Reads still work in transaction mode.
- Session pooling: the whole blueprint forwards and back, ending where it started.
- No command needs a startup parameter PgBouncer does not know (its defaults throughout).

Outcomes are checked on the real database through a direct connection, never through the
pooler's word.
"""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
from helpers import own_schema_exists, resolve_m1_anomalies, snapshot, toolkit
from pgbouncer import pgbouncer_fixture  # noqa: F401  (the fixture `pgbouncer`)

from toolkit.errors import ExitCode, PreconditionRefused
from toolkit.pooling import refuse_transaction_pooling
from toolkit.verify.fingerprint import take

MILESTONES = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")
# The sessions' settings a run could leave behind on a pooled backend.
SETTINGS = ("lock_timeout", "statement_timeout", "idle_session_timeout")
# Server defaults other than PostgreSQL's own (GitLab.com gives its role a statement_timeout),
# so a backend that kept one of the toolkit's values cannot pass for one that kept a default.
DATABASE_DEFAULTS = {"lock_timeout": "7s", "statement_timeout": "15s"}
UNSUPPORTED = "unsupported startup parameter"
CLIENTS = 8


def _direct_defaults(db) -> dict[str, str]:
    """What a fresh direct session shows (not the engine's: its begin event sets timeouts)."""
    with psycopg.connect(db.url_text, autocommit=True) as conn:
        return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in SETTINGS}


def _through_pooler(bouncer, db, clients: int = CLIENTS) -> list[tuple[int, dict[str, str]]]:
    """``clients`` fresh sessions through the pooler, all open at once, each running one
    statement concurrently (it sleeps a little), so they are spread over as many server
    backends as the pool has: what each backend shows, with its pid."""
    url = bouncer.url_text(db.name)
    sessions = [psycopg.connect(url, autocommit=True) for _ in range(clients)]
    barrier, found, errors = threading.Barrier(clients), [], []
    query = ("SELECT pg_backend_pid(), " + ", ".join(f"current_setting('{s}')" for s in SETTINGS)
             + ", pg_sleep(0.2)")

    def ask(session: psycopg.Connection) -> None:
        try:
            barrier.wait(timeout=10)
            row = session.execute(query).fetchone()
            found.append((row[0], dict(zip(SETTINGS, row[1:-1], strict=True))))
        except Exception as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(s,)) for s in sessions]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for session in sessions:
            session.close()
    assert not errors, errors
    assert len(found) == clients
    return found


def _advisory_locks(db) -> list[tuple]:
    return db.rows("""
        SELECT l.pid, l.classid, l.objid, l.objsubid FROM pg_locks l
        JOIN pg_database d ON d.oid = l.database
        WHERE l.locktype = 'advisory' AND d.datname = current_database()""")


def _assert_pool_left_clean(bouncer, db, pool_size: int) -> None:
    expected = _direct_defaults(db)
    seen = _through_pooler(bouncer, db)
    assert len({pid for pid, _ in seen}) == pool_size, "every backend of the pool was asked"
    for pid, settings in seen:
        assert settings == expected, f"backend {pid} kept a setting: {settings} != {expected}"
    assert _advisory_locks(db) == []


def _set_database_defaults(db) -> None:
    for name, value in DATABASE_DEFAULTS.items():
        db.execute(f'ALTER DATABASE "{db.name}" SET {name} = \'{value}\'')
    assert {k: v for k, v in _direct_defaults(db).items() if k in DATABASE_DEFAULTS} == DATABASE_DEFAULTS


# -- the probe ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode, settings, pooled", [
    ("session", {}, False),
    ("transaction", {}, True),
    ("transaction", {"server_round_robin": "1"}, True),
    ("statement", {}, True),
])
def test_the_probe_tells_transaction_and_statement_pooling_from_session_pooling(
        mode, settings, pooled, pgbouncer, empty_db):
    refuse_transaction_pooling(empty_db.engine)  # a direct connection is never refused
    bouncer = pgbouncer(mode, settings=settings)
    through = bouncer.database(empty_db.name)
    if pooled:
        with pytest.raises(PreconditionRefused, match="PgBouncer"):
            refuse_transaction_pooling(through.engine)
    else:
        for _ in range(3):  # no false positive however often it is asked
            refuse_transaction_pooling(through.engine)
    assert UNSUPPORTED not in bouncer.log()


# -- transaction and statement pooling: refused, nothing written, nothing left behind -----
@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_migrate_and_rollback_through_transaction_or_statement_pooling_are_refused_with_nothing_written(
        mode, pgbouncer, adversarial_db):
    _set_database_defaults(adversarial_db)
    bouncer = pgbouncer(mode, pool_size=4)
    through = bouncer.database(adversarial_db.name)
    before = snapshot(adversarial_db)
    for args in (("migrate", "milestone-1", "--yes"), ("rollback", "milestone-1"),
                 ("migrate", "milestone-1", "--yes", "--reconnect", "3")):  # a refusal: no retry
        started = time.monotonic()
        result = toolkit(through, *args)
        assert time.monotonic() - started < 5, args
        assert result.exit_code == ExitCode.REFUSED, (args, result.output)
        assert "PgBouncer" in result.output, result.output
        assert "pool_mode=session" in result.output and "directly" in result.output, result.output
        assert "nothing was written" in result.output
        assert UNSUPPORTED not in result.output
    assert snapshot(adversarial_db) == before
    assert not own_schema_exists(adversarial_db)
    _assert_pool_left_clean(bouncer, adversarial_db, pool_size=4)
    assert UNSUPPORTED not in bouncer.log()


def test_reads_work_through_transaction_pooling_and_agree_with_a_direct_connection(
        pgbouncer, adversarial_db):
    bouncer = pgbouncer("transaction")
    through = bouncer.database(adversarial_db.name)
    before = snapshot(adversarial_db)
    for args in (("status",), ("plan", "milestone-1"), ("plan",)):
        pooled = toolkit(through, "--json", *args)
        direct = toolkit(adversarial_db, "--json", *args)
        assert pooled.exit_code == 0, (args, pooled.output)
        assert direct.exit_code == 0, (args, direct.output)
        assert json.loads(pooled.stdout)["result"] == json.loads(direct.stdout)["result"]
    assert snapshot(adversarial_db) == before
    assert not own_schema_exists(adversarial_db)
    assert UNSUPPORTED not in bouncer.log()


def test_pgbouncer_defaults_refuse_an_unknown_startup_parameter_and_the_toolkit_sends_none(
        pgbouncer, legacy_db):
    bouncer = pgbouncer("transaction")
    url = bouncer.url_text(legacy_db.name)
    with pytest.raises(psycopg.OperationalError, match=UNSUPPORTED):  # what `options` would meet
        psycopg.connect(url, options="-c lock_timeout=1s").close()
    for mode in ("transaction", "session", "statement"):
        through = (bouncer if mode == "transaction" else pgbouncer(mode)).database(legacy_db.name)
        for args in (("status",), ("plan",), ("verify", "milestone-1"), ("history",),
                     ("fingerprint",), ("migrate", "milestone-1", "--dry-run"),
                     ("migrate", "milestone-1")):
            result = toolkit(through, *args)
            assert UNSUPPORTED not in result.output, (mode, args, result.output)
            # statement pooling refuses every transaction block, reads' included: named, exit 3
            refused = mode == "statement" or (mode, args) == ("transaction", ("migrate", "milestone-1"))
            assert result.exit_code == (3 if refused else 0), (mode, args, result.output)
    assert bouncer.log().count(f"closing because: {UNSUPPORTED}") == 1  # the `options` above


# -- session pooling: the whole blueprint, forwards and back ------------------------------
def _fingerprint(db):
    with db.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        fingerprint = take(conn)
        conn.rollback()
    return fingerprint.tables, fingerprint.mlflow


def test_the_whole_blueprint_forwards_and_back_through_session_pooling(pgbouncer, adversarial_db):
    resolve_m1_anomalies(adversarial_db)
    original = _fingerprint(adversarial_db)
    bouncer = pgbouncer("session", pool_size=4)
    through = bouncer.database(adversarial_db.name)
    steps = [("migrate", m, "--yes") for m in MILESTONES]
    steps += [("rollback", m) for m in reversed(MILESTONES)]
    for args in steps:
        result = toolkit(through, *args)
        assert result.exit_code == 0, (args, result.output)
        assert UNSUPPORTED not in result.output
    assert _fingerprint(adversarial_db) == original
    assert f"login attempt: db={adversarial_db.name}" in bouncer.log()  # it did go through it
    assert _advisory_locks(adversarial_db) == []
    assert UNSUPPORTED not in bouncer.log()
