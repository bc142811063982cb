"""``toolkit sql milestone-4 --rollback`` shows the rebuild a DBA will get: on a database
where milestone 4 is applied, every statement read from the recorded DDL, as it runs; and
the rebuild keeps names that need quoting."""

from __future__ import annotations

import json

import pytest
from helpers import resolve_m1_anomalies, toolkit

EVENT_LOG = """
CREATE TABLE public.ddl_seen (id bigserial PRIMARY KEY, query text NOT NULL);
CREATE FUNCTION public.note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.ddl_seen (query) VALUES (current_query()); END $$;
CREATE EVENT TRIGGER note_ddl ON ddl_command_end EXECUTE FUNCTION public.note_ddl();
"""
ODD_NAMES = """
CREATE INDEX "Experiments By Name" ON ml_experiments (name);
ALTER TABLE ml_experiment_metadata ADD CONSTRAINT "Positive Id" CHECK (id > 0);
ALTER TABLE ml_experiment_metadata ADD CONSTRAINT "Metadata Of Experiment"
    FOREIGN KEY (experiment_id) REFERENCES ml_experiments (id) ON DELETE CASCADE;
"""
ODD_OBJECTS = """
SELECT 'index', indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
WHERE indexrelid = to_regclass('"Experiments By Name"')
UNION ALL
SELECT 'constraint', conname, pg_get_constraintdef(oid) FROM pg_constraint
WHERE conname IN ('Positive Id', 'Metadata Of Experiment') ORDER BY 1, 2"""
SINGLE_LINE = ("ALTER TABLE", "DROP TRIGGER", "CREATE TRIGGER", "CREATE SEQUENCE", "CREATE INDEX",
               "CREATE UNIQUE INDEX", "DROP INDEX")


@pytest.fixture
def applied(make_database):
    """Milestones 1-3 applied, objects whose names need quoting added, then milestone 4."""
    db = make_database("adversarial:small")
    resolve_m1_anomalies(db)
    for milestone in ("milestone-1", "milestone-2", "milestone-3"):
        assert toolkit(db, "migrate", milestone).exit_code == 0
    _run(db, ODD_NAMES)
    odd_before = db.rows(ODD_OBJECTS)
    assert len(odd_before) == 3
    assert toolkit(db, "migrate", "milestone-4", "--yes").exit_code == 0
    return db, odd_before


def _run(db, script: str) -> None:
    for statement in script.strip().split(";\n"):
        db.execute(statement)


def _rebuild_statements(db) -> tuple[str, list[str]]:
    shown = toolkit(db, "--json", "sql", "milestone-4", "--rollback")
    assert shown.exit_code == 0, shown.output
    blocks = json.loads(shown.output)["result"]["statements"]
    text = "\n".join(blocks)
    lines = [line.rstrip(";") for block in blocks if "/ rebuild-" in block or "foreign-keys" in block
             for line in block.splitlines() if line.startswith(SINGLE_LINE)]
    return text, lines


def test_rollback_sql_on_an_applied_database_is_what_the_rollback_runs(applied):
    db, odd_before = applied
    runs_before = db.scalar("SELECT count(*) FROM toolkit.runs")
    text, shown = _rebuild_statements(db)
    assert "read at run time" not in text, text
    assert "CREATE TABLE ml_experiments (" in text
    assert 'DROP TRIGGER IF EXISTS trigger_ml_candidates_model_id_transition ON ml_candidates' in shown
    assert any('ADD CONSTRAINT "Metadata Of Experiment" FOREIGN KEY' in s and s.endswith("NOT VALID")
               for s in shown), shown
    assert 'ALTER TABLE ml_experiment_metadata VALIDATE CONSTRAINT "Metadata Of Experiment"' in shown
    assert db.scalar("SELECT count(*) FROM toolkit.runs") == runs_before  # it wrote nothing

    _run(db, EVENT_LOG)
    assert toolkit(db, "rollback", "milestone-4").exit_code == 0
    seen = {row.query.strip().rstrip(";") for row in db.rows("SELECT query FROM public.ddl_seen")}
    assert len(shown) > 10
    assert [s for s in shown if s not in seen] == []
    assert db.rows(ODD_OBJECTS) == odd_before  # names that need quoting, rebuilt as they were


def test_rollback_sql_without_a_recording_shows_the_query_that_yields_it(make_database):
    db = make_database("adversarial:small")
    printed = toolkit(db, "sql", "milestone-4", "--rollback").output  # connected: nothing recorded
    assert "none recorded in this database yet" in printed
    assert "FROM toolkit.m4_archived_ddl WHERE phase = ANY(ARRAY['foreign_keys'])" in printed
    assert db.scalar("SELECT to_regclass('toolkit.runs') IS NULL")  # read-only: created nothing
