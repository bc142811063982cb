"""Running the CLI against a test database, in-process (CliRunner) or as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from toolkit.cli.main import cli
from toolkit.engine.batches import KeysetPass
from toolkit.engine.results import StepPlan
from toolkit.engine.step import Step
from toolkit.verify.digest import digests
from toolkit.verify.fingerprint import take

# What the suite did on purpose, summed up at the end of the run (conftest's terminal
# summary), so the numbers quoted about fault injection come from a run, not from counting.
TALLY: Counter[str] = Counter()

ML_AND_OWN = ("packages_packages", "packages_package_files", "ml_candidates", "ml_experiments",
              "ml_models", "ml_candidate_params", "ml_candidate_metrics")


class Queries:
    """One-statement helpers for any database object of the suite with an ``engine``
    (conftest's ``Database``, the fault server's and the replication pair's)."""

    engine: sa.engine.Engine

    def scalar(self, sql: str, **params: object):
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: object) -> list[sa.Row]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def execute(self, sql: str, **params: object) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params)

    def dispose(self) -> None:
        self.engine.dispose()


def toolkit(db, *args: str, env: dict | None = None) -> Result:
    return CliRunner().invoke(cli, ["--database-url", db.url_text, *args], env=env,
                              catch_exceptions=False)


def toolkit_json(db, *args: str) -> tuple[int, dict]:
    result = toolkit(db, "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def toolkit_process(db, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOOLKIT_DATABASE_URL": db.url_text, **(env or {})}
    if any(name.startswith("TOOLKIT_FAULT_") for name in env or {}):
        TALLY["runs killed with SIGKILL by fault injection"] += 1
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=full_env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def snapshot(db, tables: tuple[str, ...] = ML_AND_OWN) -> dict:
    with db.engine.connect() as conn:
        return {t: (d.rows, d.digest) for t, d in digests(conn, tables).items()}


def own_schema_exists(db) -> bool:
    return db.scalar("SELECT to_regnamespace('toolkit') IS NOT NULL")


def schema_snapshot(db, tables: tuple[str, ...] = ("ml_candidates", "ml_experiments", "ml_models",
                                                   "packages_packages")) -> dict:
    """What reflection sees: columns, constraints, indexes, triggers and public functions."""
    names = list(tables)
    return {
        "columns": db.rows("""
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid)
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE c.relname = ANY(:n) AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY c.relname, a.attnum""", n=names),
        "constraints": db.rows("""
            SELECT c.relname, k.conname, pg_get_constraintdef(k.oid), k.convalidated
            FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
            WHERE c.relname = ANY(:n) ORDER BY 1, 2""", n=names),
        "indexes": db.rows("""
            SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), i.indisvalid
            FROM pg_index i WHERE i.indrelid::regclass::text = ANY(:n) ORDER BY 1""", n=names),
        "triggers": db.rows("""
            SELECT tgname, pg_get_triggerdef(oid), tgenabled FROM pg_trigger
            WHERE tgrelid::regclass::text = ANY(:n) AND NOT tgisinternal ORDER BY 1""", n=names),
        "functions": db.rows("""
            SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
              AND p.prokind = 'f' AND p.proname LIKE 'trigger%' ORDER BY 1"""),
    }


def columns_as_sets(schema: dict) -> dict:
    """A schema snapshot whose columns are compared as a set: milestone 4's rollback adds
    experiment_id back as the last column; everything else must be exact."""
    return {**schema, "columns": sorted(schema["columns"])}


def resolve_m1_anomalies(db) -> None:
    """What an operator does about milestone 1's blocking anomalies, as docs/blueprint.md says."""
    db.execute("""
        -- cross-project package: unlink it from the candidate
        UPDATE ml_candidates c SET package_id = NULL FROM packages_packages p
        WHERE p.id = c.package_id AND p.package_type = 7 AND p.project_id <> c.project_id;
        -- collision: mark the existing ml_model twin pending destruction
        UPDATE packages_packages q SET status = 4 FROM packages_packages p
        WHERE p.package_type = 7 AND q.package_type = 14 AND q.project_id = p.project_id
          AND q.name = p.name AND q.version = p.version AND q.status <> 4 AND p.status <> 4
          AND p.id IN (SELECT package_id FROM ml_candidates WHERE package_id IS NOT NULL);
        -- an over-long status message: shorten it
        UPDATE packages_packages SET status_message = left(status_message, 255)
        WHERE char_length(status_message) > 255;
    """)


class OnePassStep(Step):
    """A test-only step: one keyset pass over ``table`` running ``change_sql``, planning
    nothing and verifying nothing (the engine's behaviour is what such tests look at)."""

    def __init__(self, name: str, table: str, change_sql: str):
        self.name, self.description = name, f"test pass over {table}"
        self.table, self.change_sql = table, change_sql

    def plan(self, conn):
        return StepPlan(step=self.name, description=self.description, rows=0)

    def forward(self):
        return [KeysetPass(self.name, self.description, self.table, self.change_sql)]


# -- comparing end states with an uninterrupted twin ------------------------------------
# The toolkit's own bookkeeping differs between a resumed run and one that was not
# interrupted (two runs, other ids and times); everything else must be equal.
BOOKKEEPING = ("runs", "checkpoints", "milestones", "fingerprints", "alembic_version", "runner_lease",
               "run_writes", "run_controls", "run_progress")


def ledgers(db) -> dict[str, list]:
    """The toolkit's ledgers and archive row for row, without run ids and timestamps (a
    resumed milestone has two runs where the uninterrupted one has one)."""
    tables = [r[0] for r in db.rows("""
        SELECT table_name FROM information_schema.tables WHERE table_schema = 'toolkit'
          AND table_name <> ALL(:skip) ORDER BY 1""", skip=list(BOOKKEEPING))]
    found = {}
    for table in tables:
        columns = [r[0] for r in db.rows("""
            SELECT column_name FROM information_schema.columns
            WHERE table_schema = 'toolkit' AND table_name = :t AND column_name <> 'run_id'
              AND data_type NOT LIKE 'timestamp%' ORDER BY ordinal_position""", t=table)]
        listed = ", ".join(f'"{c}"' for c in columns)
        found[table] = [tuple(r) for r in db.rows(f"SELECT {listed} FROM toolkit.{table} ORDER BY {listed}")]
    return found


def end_state(db) -> tuple:
    """Every ML table and the MLflow view (fingerprint), and the ledgers row for row."""
    with db.engine.connect() as conn:
        fingerprint = take(conn)
        conn.rollback()
    return fingerprint.tables, fingerprint.mlflow, ledgers(db)


def rows_compared(state: tuple) -> int:
    tables, _, found = state
    return sum(t["rows"] for t in tables.values() if t) + sum(len(rows) for rows in found.values())


def differences(got: tuple, expected: tuple) -> list[str]:
    """Which parts of two end states differ (for an assertion's message)."""
    names = ("tables", "mlflow", "ledgers")
    found = []
    for name, a, b in zip(names, got, expected, strict=True):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                found.append(f"{name}.{key}")
    return found


def hba_role(db, name: str, rules: tuple[str, ...], password: str | None) -> Iterator[str]:
    """A login role of the test's own, let in by ``rules`` (pg_hba.conf lines, first), for
    a fixture to ``yield from``. Only where the test server's pg_hba.conf is a file on this
    machine (the embedded server; a container or a shared server cannot be reconfigured)."""
    hba = Path(db.scalar("SHOW hba_file"))
    if not os.access(hba, os.W_OK):
        pytest.skip(f"{hba} is not writable from here (the test server is not local)")
    db.execute(f"DROP ROLE IF EXISTS {name}")
    db.execute(f"CREATE ROLE {name} LOGIN SUPERUSER" + (f" PASSWORD '{password}'" if password else ""))
    original = hba.read_text()
    hba.write_text("".join(f"{rule}\n" for rule in rules) + original)
    db.execute("SELECT pg_reload_conf()")
    try:
        yield name
    finally:
        hba.write_text(original)
        db.execute("SELECT pg_reload_conf()")
        db.execute(f"DROP ROLE {name}")
