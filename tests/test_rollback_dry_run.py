"""``rollback MILESTONE --dry-run``: what the rollback would restore and remove, pass by
pass, counted read-only; then the rollback itself changes exactly those counts. Nothing is
written (every ML table, the ledgers, the archive, the schema and the toolkit's own history
are the same after it), and it is refused where the rollback would be."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from helpers import BOOKKEEPING, end_state, own_schema_exists, schema_snapshot, toolkit, toolkit_json
from sqlalchemy.exc import DBAPIError

from toolkit import milestones as registry
from toolkit.db import create_engine
from toolkit.engine.inspection import Inspector
from toolkit.errors import ExitCode


def _everything(db) -> tuple:
    """The ML tables and MLflow view, the ledgers and archive, the schema, and the toolkit's
    bookkeeping (runs, states, checkpoints, fingerprints, lease) row for row."""
    kept = {table: [tuple(r) for r in db.rows(f"SELECT * FROM toolkit.{table} ORDER BY 1")]
            for table in BOOKKEEPING}
    return end_state(db), schema_snapshot(db), kept


def _dry_run_then_rollback(db, milestone: str) -> tuple[dict, dict]:
    before = _everything(db)
    code, dry = toolkit_json(db, "rollback", milestone, "--dry-run")
    assert code == 0, dry
    shown = toolkit(db, "rollback", milestone, "--dry-run")
    assert shown.exit_code == 0, shown.output
    assert shown.output.rstrip().endswith("Dry run: nothing was written."), shown.output
    assert _everything(db) == before
    code, done = toolkit_json(db, "rollback", milestone)
    assert code == 0, done
    return dry["result"], done["result"]


def _same_counts(dry: dict, done: dict) -> None:
    """Each batched pass restores or removes what the dry run counted, and the schema
    changes it undoes are those it said were left to undo."""
    counted = {p["name"]: p for p in dry["passes"]}
    assert [p["name"] for p in done["passes"]] == list(counted)
    for p in done["passes"]:
        if p["schema_change"]:
            assert counted[p["name"]]["kind"] == "schema change"
            assert counted[p["name"]]["pending"] == p["changed"], p
        elif counted[p["name"]]["kind"] == "rows":
            assert counted[p["name"]]["rows"] == p["rows"], (p, counted[p["name"]])
    assert dry["rows"] == done["rows"]
    assert dry["schema_changes"] == sum(p["schema_change"] and p["changed"] for p in done["passes"])


@pytest.mark.parametrize("n", [1, 3])
def test_a_dry_run_counts_what_the_rollback_then_does_and_writes_nothing(before_milestone, n):
    db = before_milestone(n + 1, "realistic")
    dry, done = _dry_run_then_rollback(db, f"milestone-{n}")
    assert dry["rows"] > 0 and dry["state"] == "verified"
    _same_counts(dry, done)
    if n == 3:
        first = dry["passes"][0]
        assert first["name"] == "create-models-for-experiments:revert"
        assert first["breakdown"]["created models removed"] == first["rows"] > 0
        assert first["breakdown"]["candidates unlinked (model_id := NULL)"] > 0


def test_milestone_4s_dry_run_counts_the_rows_it_restores_from_the_archive(before_milestone):
    db = before_milestone(4, "realistic")
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    archived = db.scalar("SELECT count(*) FROM toolkit.m4_archive_ml_experiments")
    dry, done = _dry_run_then_rollback(db, "milestone-4")
    restored = next(p for p in dry["passes"] if p["name"] == "restore-ml-experiments")
    assert restored["rows"] == archived > 0
    assert dry["schema_changes"] > 10
    _same_counts(dry, done)


def test_refused_where_the_rollback_would_be(before_milestone):
    db = before_milestone(4, "realistic")
    before = _everything(db)
    result = toolkit(db, "rollback", "milestone-2", "--dry-run")
    assert result.exit_code == ExitCode.REFUSED, result.output
    assert "milestone-2 cannot be rolled back while milestone-3 is applied" in result.output
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    assert toolkit(db, "archive", "drop", "--yes").exit_code == 0
    before = _everything(db)
    code, doc = toolkit_json(db, "rollback", "milestone-4", "--dry-run")
    assert code == ExitCode.REFUSED, doc
    assert doc["error"]["problem"].startswith("milestone-4 cannot be rolled back: its archive was dropped by run")
    assert _everything(db) == before


def test_the_dry_runs_transaction_is_read_only_on_the_server(realistic_db):
    """Whatever the pooled connection did before: the server refuses a write in it. On a
    database the toolkit never touched there is nothing to undo, and its schema stays away."""
    code, doc = toolkit_json(realistic_db, "rollback", "milestone-1", "--dry-run")
    assert code == 0 and doc["result"]["passes"] == [] and doc["result"]["state"] == "not started", doc
    assert not own_schema_exists(realistic_db)
    engine = create_engine(realistic_db.url)
    inspector = Inspector(engine, registry.plan())
    try:
        for _ in range(2):
            with engine.begin() as conn:  # the same pooled connection, read-write
                conn.execute(sa.text("SELECT 1"))
            with inspector.read_only() as conn:
                assert conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
                assert conn.execute(sa.text("SHOW transaction_isolation")).scalar() == "repeatable read"
                with pytest.raises(DBAPIError) as refused:
                    conn.execute(sa.text("CREATE TABLE toolkit_dry_run_wrote ()"))
                assert getattr(refused.value.orig, "sqlstate", None) == "25006"
    finally:
        engine.dispose()
    assert realistic_db.scalar("SELECT to_regclass('toolkit_dry_run_wrote') IS NULL")
