"""The one commit unit (engine/fenced.py): a fenced batch sets its own timeouts and
commits only under the run's lease, and a write committed around the unit while a run
holds the lease is refused loudly and rolled back (the commit hook is a safety net only)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from toolkit.db import create_engine
from toolkit.engine import fenced, state
from toolkit.engine.lease import Hold, HoldLost
from toolkit.schema.migrations import ensure_own_tables

TIMEOUTS = sa.text("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")


def _claimed_hold(db, label: str) -> Hold:
    """A hold on an engine of its own, as each toolkit process has."""
    hold = Hold(create_engine(db.url), label, wait_s=0).__enter__()
    with hold.engine.connect() as conn:
        ensure_own_tables(conn)
        hold.claim(conn)
    return hold


def test_a_write_committed_around_the_fenced_commit_is_refused_loudly_and_rolled_back(legacy_db):
    db = legacy_db
    db.execute("INSERT INTO projects (id, name) VALUES (1, 'p')")
    hold = _claimed_hold(db, "toolkit test")
    try:
        with hold.engine.connect() as conn:
            conn.execute(sa.text("DELETE FROM projects WHERE id = 1"))
            with pytest.raises(fenced.UnfencedCommit, match="committed around the fenced commit"):
                conn.commit()
            conn.rollback()
            conn.execute(sa.text("SELECT 1"))
            conn.commit()  # a read committed around it wrote nothing: let through
            conn.execute(sa.text("UPDATE projects SET name = 'q' WHERE id = 1"))
            fenced.commit(conn)  # the same kind of write through the unit commits
    finally:
        hold.__exit__(None, None, None)
        hold.engine.dispose()
    assert db.rows("SELECT id, name FROM projects") == [(1, "q")]


def test_a_fenced_batch_sets_its_own_timeouts_and_commits_nothing_once_the_hold_is_lost(legacy_db):
    db = legacy_db
    db.execute("INSERT INTO projects (id, name) VALUES (1, 'p'), (2, 'q')")
    hold = _claimed_hold(db, "toolkit test")
    try:
        with hold.engine.connect() as conn:
            run_id = state.start_run(conn, "test", None, {})
            hold.record_run(conn, run_id)
            fenced.commit(conn)
            before = conn.execute(TIMEOUTS).one()
            conn.rollback()
            with fenced.batch(conn, timeouts=(1234, 56789)):
                assert tuple(conn.execute(TIMEOUTS).one()) == ("1234ms", "56789ms")
                conn.execute(sa.text("DELETE FROM projects WHERE id = 1"))
            assert conn.execute(TIMEOUTS).one() == before  # they ended with the batch
            conn.rollback()
            db.scalar("SELECT pg_terminate_backend(:p, 5000)", p=hold.lock_pid)
            with pytest.raises(HoldLost, match=r"its lock session .* ended"), \
                    fenced.batch(conn, timeouts=(1234, 56789)):
                conn.execute(sa.text("DELETE FROM projects WHERE id = 2"))
    finally:
        hold.__exit__(None, None, None)
        hold.engine.dispose()
    assert db.rows("SELECT id FROM projects ORDER BY id") == [(2,)]
