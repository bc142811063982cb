"""The change each milestone makes, written by hand, for ``scripts/bench.py`` to time against
the toolkit's whole command (and for tests/test_bench_hand.py to prove it the same change).

Four forms, each a list of statements run in autocommit (as a DBA types them into psql:
each statement its own transaction, CREATE INDEX CONCURRENTLY allowed):

* ``bare``: what a DBA types on a quiet database: GitLab's DDL as written (plain CREATE
  INDEX, a foreign key or CHECK added valid), the data change as one UPDATE / INSERT each;
* ``online``: the same change made safe for a busy database: CREATE INDEX CONCURRENTLY,
  constraints added NOT VALID then VALIDATE, NOT NULL through a validated CHECK, the
  transition triggers that give rows GitLab writes meanwhile their new column; milestone
  4 first copies what it drops to archive tables;
* ``guarded``: the online form plus the anomaly exclusions the toolkit applies (milestone
  1's cross-project packages, ml_model collisions and over-long status messages; only rows
  that still need the change; milestone 4's preconditions and the MLflow ids it keeps),
  still one statement each;
* ``ledgered``: the guarded form whose data statements also write the toolkit's undo
  ledgers (``INSERT … SELECT`` of the same rows, in the same statement): what the ledger
  costs without the batching around it. Milestones 2 and 4 have no ledger of rows (2 is
  undone by dropping the column; 4's archive is already in the online form).

Milestone 1 has no DDL, so its bare and online forms are the same statement.

Milestone 3's slugs are computed in Python (:func:`toolkit.milestones.m3_models_for_experiments
.planned_slugs`, the toolkit's own rule, timed with the form): no SQL expression gives
GitLab's model-name slug with its per-project suffixes, so a DBA would compute them too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from psycopg.errors import DeadlockDetected, LockNotAvailable
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.names import (
    M1_LEDGER,
    M2_FOREIGN_KEY,
    M2_INDEX,
    M2_TRIGGER,
    M3_CHECK,
    M3_COPIED_METADATA,
    M3_CREATED_MODELS,
    M3_METADATA_CLASHES,
    M3_TRIGGER,
    M4_EXPERIMENT_IDS,
    M4_MODEL_ID_CHECK,
    M4_UNIQUE_INDEX,
)

FORMS = ("bare", "online", "guarded", "ledgered")

# A statement, or a step computed on the connection (milestone 3's slugs) that returns the
# parameters the statements after it bind.
Statement = str | Callable[[Connection], dict[str, Any]]

# -- milestone 1 ------------------------------------------------------------------------
M1_BARE = """
UPDATE packages_packages SET package_type = 14
WHERE package_type = 7
  AND id IN (SELECT package_id FROM ml_candidates WHERE package_id IS NOT NULL)"""

# The toolkit's three blocking anomalies, excluded as a DBA would write them.
M1_GUARDED_UPDATE = """
UPDATE packages_packages p SET package_type = 14
WHERE p.package_type = 7
  AND p.id IN (SELECT package_id FROM ml_candidates WHERE package_id IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM ml_candidates x
                  WHERE x.package_id = p.id AND x.project_id IS DISTINCT FROM p.project_id)
  AND NOT (p.status <> 4 AND EXISTS (
      SELECT 1 FROM packages_packages q
      WHERE q.package_type = 14 AND q.project_id = p.project_id AND q.name = p.name
        AND q.version = p.version AND q.status <> 4 AND q.id <> p.id))
  AND COALESCE(char_length(p.status_message) <= 255, true)"""

M1_LEDGERED = f"""
WITH converted AS ({M1_GUARDED_UPDATE.strip()}
    RETURNING p.id)
INSERT INTO {M1_LEDGER} (package_id, previous_package_type)
SELECT id, 7 FROM converted"""

# -- milestone 2 ------------------------------------------------------------------------
M2_ADD_COLUMN = "ALTER TABLE ml_candidates ADD COLUMN model_id bigint"
M2_BACKFILL_BARE = """
UPDATE ml_candidates c SET model_id = e.model_id
FROM ml_experiments e WHERE e.id = c.experiment_id AND e.model_id IS NOT NULL"""
M2_BACKFILL_GUARDED = """
UPDATE ml_candidates c SET model_id = e.model_id
FROM ml_experiments e WHERE e.id = c.experiment_id AND c.model_id IS DISTINCT FROM e.model_id"""
M2_FK = (f"ALTER TABLE ml_candidates ADD CONSTRAINT {M2_FOREIGN_KEY} FOREIGN KEY (model_id) "
         "REFERENCES ml_models(id) ON DELETE CASCADE")
M2_TRIGGER_SQL = (f"""
CREATE FUNCTION {M2_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
IF TG_OP = 'INSERT' AND NEW.model_id IS NOT NULL THEN
  RETURN NEW;
END IF;
SELECT model_id INTO NEW.model_id FROM ml_experiments WHERE id = NEW.experiment_id FOR SHARE;
RETURN NEW;
END
$$""", f"""CREATE TRIGGER {M2_TRIGGER} BEFORE INSERT OR UPDATE OF experiment_id ON ml_candidates
FOR EACH ROW EXECUTE FUNCTION {M2_TRIGGER}()""")


def _m2(backfill: str, online: bool) -> list[Statement]:
    if not online:
        return [M2_ADD_COLUMN, backfill, f"CREATE INDEX {M2_INDEX} ON ml_candidates USING btree (model_id)",
                M2_FK]
    return [M2_ADD_COLUMN,
            f"CREATE INDEX CONCURRENTLY {M2_INDEX} ON ml_candidates USING btree (model_id)",
            f"{M2_FK} NOT VALID", *M2_TRIGGER_SQL, backfill,
            f"ALTER TABLE ml_candidates VALIDATE CONSTRAINT {M2_FOREIGN_KEY}"]


# -- milestone 3 ------------------------------------------------------------------------
M3_ADD_COLUMN = "ALTER TABLE ml_models ADD COLUMN display_name text"
M3_CHECK_SQL = f"ALTER TABLE ml_models ADD CONSTRAINT {M3_CHECK} CHECK (char_length(display_name) <= 255)"
M3_TRIGGER_SQL = (f"""
CREATE FUNCTION {M3_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
IF NEW.display_name IS NULL THEN
  NEW.display_name := NEW.name;
END IF;
RETURN NEW;
END
$$""", f"CREATE TRIGGER {M3_TRIGGER} BEFORE INSERT ON ml_models FOR EACH ROW EXECUTE FUNCTION {M3_TRIGGER}()")


def m3_slugs(conn: Connection) -> dict[str, Any]:
    """Every experiment without a model and its slug, by the toolkit's own rule."""
    from toolkit.milestones.m3_create import planned_slugs

    planned = sorted((p.experiment_id, p.slug) for p in planned_slugs(conn))
    return {"ids": [i for i, _ in planned], "slugs": [s for _, s in planned]}


SLUGS = "unnest(CAST(:ids AS bigint[]), CAST(:slugs AS text[])) AS s(experiment_id, slug)"
M3_CREATE_MODELS = f"""
INSERT INTO ml_models (created_at, updated_at, project_id, name, user_id, display_name)
SELECT e.created_at, e.updated_at, e.project_id, s.slug, e.user_id, e.name
FROM {SLUGS} JOIN ml_experiments e ON e.id = s.experiment_id
ORDER BY e.id"""
M3_LINK_EXPERIMENTS = f"""
UPDATE ml_experiments e SET model_id = m.id
FROM {SLUGS} JOIN ml_models m ON m.name = s.slug
WHERE e.id = s.experiment_id AND m.project_id = e.project_id"""
M3_LINK_EXPERIMENTS_LEDGERED = f"""
WITH linked AS ({M3_LINK_EXPERIMENTS.strip()} AND e.model_id IS NULL
    RETURNING e.id AS experiment_id, m.id AS model_id, e.project_id)
INSERT INTO {M3_CREATED_MODELS} (model_id, experiment_id, project_id)
SELECT model_id, experiment_id, project_id FROM linked"""
M3_COPY_METADATA = """
INSERT INTO ml_model_metadata (created_at, updated_at, model_id, name, value, project_id)
SELECT em.created_at, em.updated_at, e.model_id, em.name, em.value, em.project_id
FROM ml_experiments e JOIN ml_experiment_metadata em ON em.experiment_id = e.id
WHERE e.model_id IS NOT NULL
ORDER BY e.id, em.id
ON CONFLICT (model_id, name) DO NOTHING"""
M3_RECORD_CLASHES = f"""
INSERT INTO {M3_METADATA_CLASHES} (experiment_id, name, model_id, experiment_value, model_value)
SELECT e.id, em.name, e.model_id, em.value, mm.value
FROM ml_experiments e
JOIN ml_experiment_metadata em ON em.experiment_id = e.id
JOIN ml_model_metadata mm ON mm.model_id = e.model_id AND mm.name = em.name
WHERE mm.value <> em.value"""
M3_COPY_METADATA_LEDGERED = f"""
WITH copied AS ({M3_COPY_METADATA.strip()}
    RETURNING id, model_id)
INSERT INTO {M3_COPIED_METADATA} (model_metadata_id, model_id) SELECT id, model_id FROM copied"""
M3_LINK_CANDIDATES = M2_BACKFILL_GUARDED


def _m3(form: str) -> list[Statement]:
    guarded = form in ("guarded", "ledgered")
    display = "UPDATE ml_models SET display_name = name" + (" WHERE display_name IS NULL" if guarded else "")
    if form == "bare":
        schema = [M3_ADD_COLUMN, M3_CHECK_SQL, display]
    else:
        schema = [M3_ADD_COLUMN, f"{M3_CHECK_SQL} NOT VALID", *M3_TRIGGER_SQL, display,
                  f"ALTER TABLE ml_models VALIDATE CONSTRAINT {M3_CHECK}"]
    link = M3_LINK_EXPERIMENTS_LEDGERED if form == "ledgered" else (
        M3_LINK_EXPERIMENTS + (" AND e.model_id IS NULL" if guarded else ""))
    metadata = [M3_RECORD_CLASHES, M3_COPY_METADATA_LEDGERED] if form == "ledgered" else [M3_COPY_METADATA]
    return [*schema, m3_slugs, M3_CREATE_MODELS, link, *metadata, M3_LINK_CANDIDATES]


# -- milestone 4 ------------------------------------------------------------------------
ARCHIVE_SCHEMA = "bench_hand_archive"
M4_ARCHIVE = (
    f"CREATE SCHEMA {ARCHIVE_SCHEMA}",
    f"CREATE TABLE {ARCHIVE_SCHEMA}.ml_experiments (LIKE ml_experiments, PRIMARY KEY (id))",
    f"INSERT INTO {ARCHIVE_SCHEMA}.ml_experiments SELECT * FROM ml_experiments",
    f"CREATE TABLE {ARCHIVE_SCHEMA}.ml_experiment_metadata (LIKE ml_experiment_metadata, PRIMARY KEY (id))",
    f"INSERT INTO {ARCHIVE_SCHEMA}.ml_experiment_metadata SELECT * FROM ml_experiment_metadata",
    f"CREATE TABLE {ARCHIVE_SCHEMA}.candidate_experiments "
    "(candidate_id bigint PRIMARY KEY, experiment_id bigint)",
    f"INSERT INTO {ARCHIVE_SCHEMA}.candidate_experiments SELECT id, experiment_id FROM ml_candidates",
)
M4_DROPS = (
    f"DROP TRIGGER IF EXISTS {M2_TRIGGER} ON ml_candidates", f"DROP FUNCTION IF EXISTS {M2_TRIGGER}()",
    f"DROP TRIGGER IF EXISTS {M3_TRIGGER} ON ml_models", f"DROP FUNCTION IF EXISTS {M3_TRIGGER}()",
    "ALTER TABLE ml_candidates DROP COLUMN experiment_id",
    "DROP TABLE ml_experiment_metadata", "DROP FUNCTION IF EXISTS trigger_2b8fdc9b4a4e()",
    "DROP TABLE ml_experiments",
)
# Milestone 4's preconditions (each must find nothing) and the MLflow ids it keeps.
M4_GUARDS = (
    "SELECT count(*) FROM ml_candidates WHERE model_id IS NULL",
    """SELECT count(*) FROM ml_experiment_metadata em JOIN ml_experiments e ON e.id = em.experiment_id
       LEFT JOIN ml_model_metadata mm ON mm.model_id = e.model_id AND mm.name = em.name
       WHERE e.model_id IS NULL OR (mm.value IS DISTINCT FROM em.value AND NOT EXISTS (
           SELECT 1 FROM toolkit.m3_metadata_clashes k
           WHERE k.experiment_id = e.id AND k.name = em.name AND k.experiment_value = em.value))""",
)
M4_KEEP_IDS = f"""INSERT INTO {M4_EXPERIMENT_IDS}
    (id, project_id, iid, model_id, name, created_at, updated_at, deleted_on)
SELECT id, project_id, iid, model_id, name, created_at, updated_at, deleted_on FROM ml_experiments
ON CONFLICT (id) DO NOTHING"""


def _m4(form: str) -> list[Statement]:
    if form == "bare":
        return ["ALTER TABLE ml_candidates ALTER COLUMN model_id SET NOT NULL",
                f"CREATE UNIQUE INDEX {M4_UNIQUE_INDEX} ON ml_candidates USING btree (model_id, eid)",
                *M4_DROPS]
    guards = [*M4_GUARDS, M4_KEEP_IDS] if form != "online" else []
    return [*guards, *M4_ARCHIVE,
            f"ALTER TABLE ml_candidates ADD CONSTRAINT {M4_MODEL_ID_CHECK} "
            "CHECK (model_id IS NOT NULL) NOT VALID",
            f"ALTER TABLE ml_candidates VALIDATE CONSTRAINT {M4_MODEL_ID_CHECK}",
            "ALTER TABLE ml_candidates ALTER COLUMN model_id SET NOT NULL",
            f"ALTER TABLE ml_candidates DROP CONSTRAINT {M4_MODEL_ID_CHECK}",
            f"CREATE UNIQUE INDEX CONCURRENTLY {M4_UNIQUE_INDEX} "
            "ON ml_candidates USING btree (model_id, eid)",
            *M4_DROPS]


def statements(milestone: str, form: str) -> list[Statement]:
    """The hand-written change of ``milestone`` in ``form`` (one of :data:`FORMS`)."""
    if form not in FORMS:
        raise ValueError(form)
    if milestone == "milestone-1":
        return [{"bare": M1_BARE, "online": M1_BARE, "guarded": M1_GUARDED_UPDATE,
                 "ledgered": M1_LEDGERED}[form]]
    if milestone == "milestone-2":
        return _m2(M2_BACKFILL_BARE if form == "bare" else M2_BACKFILL_GUARDED, online=form != "bare")
    if milestone == "milestone-3":
        return _m3(form)
    if milestone == "milestone-4":
        return _m4(form)
    raise ValueError(milestone)


def prepare(conn: Connection, milestone: str, form: str) -> None:
    """Untimed, before a form runs: the toolkit's own tables its ledgers (and milestone 4's
    kept ids) write into, as the toolkit creates them before its first run."""
    if form in ("guarded", "ledgered") or milestone == "milestone-4":
        from toolkit.schema.migrations import ensure_own_tables

        ensure_own_tables(conn)
        conn.commit()


def run(url: sa.URL | str, milestone: str, form: str) -> dict[str, Any]:
    """Run one form on ``url``'s database: its wall time (and each statement's), rows changed."""
    # a plain engine, as psql is: none of the toolkit's per-transaction timeouts
    engine = sa.create_engine(url if isinstance(url, sa.URL) else sa.make_url(url))
    try:
        with engine.connect() as conn:
            prepare(conn, milestone, form)
        engine_ac = engine.execution_options(isolation_level="AUTOCOMMIT")
        with engine_ac.connect() as conn:
            # a DBA's psql session: no statement or lock timeout of the toolkit's
            conn.execute(sa.text("SET statement_timeout = 0; SET lock_timeout = 0"))
            params: dict[str, Any] = {}
            each, rows, retried = [], 0, 0
            started = time.perf_counter()
            for statement in statements(milestone, form):
                began = time.perf_counter()
                if callable(statement):
                    # (streamed reads need a transaction: a connection of its own)
                    with engine.connect() as reading:
                        params.update(statement(reading))
                else:
                    bound = {k: v for k, v in params.items() if f":{k}" in statement}
                    result, tries = _execute(conn, statement, bound)
                    retried += tries
                    rows += max(result.rowcount, 0) if not result.returns_rows else 0
                each.append(round(time.perf_counter() - began, 4))
            seconds = time.perf_counter() - started
    finally:
        engine.dispose()
    return {"seconds": round(seconds, 3), "rows": rows, "statements": each, "retried": retried}


RETRIES = 20


def _execute(conn: Connection, statement: str, params: dict[str, Any]) -> tuple[sa.CursorResult, int]:
    """One statement, typed again after a deadlock with the application's writes (milestone
    4's DROP COLUMN against a run being logged), as a DBA would: (its result, the retries)."""
    for tried in range(RETRIES + 1):
        try:
            return conn.execute(sa.text(statement), params), tried
        except sa.exc.OperationalError as error:
            if tried == RETRIES or not isinstance(error.orig, (DeadlockDetected, LockNotAvailable)):
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


# -- the same change? -------------------------------------------------------------------
def watermarks(conn: Connection) -> dict[str, int]:
    """The largest id of each table a milestone reads, before it runs: the rows compared are
    those that existed then (the application writer adds more meanwhile)."""
    marks = {}
    for table in ("packages_packages", "ml_candidates", "ml_experiments", "ml_models"):
        marks[table] = conn.execute(sa.text(f"SELECT COALESCE(max(id), 0) FROM {table}")).scalar_one()
    return marks


def _md5(conn: Connection, sql: str, marks: dict[str, int]) -> str:
    return conn.execute(sa.text(f"SELECT count(*) || ':' || COALESCE(md5(string_agg(r, ',' ORDER BY r)), '') "
                                f"FROM ({sql}) AS t(r)"), marks).scalar_one()


def changed_rows(conn: Connection, milestone: str, marks: dict[str, int]) -> dict[str, str]:
    """A digest of the rows ``milestone`` changes, among those that existed before it ran,
    by natural key where ids depend on the order of creation (milestone 3's models and
    tags): equal digests after the toolkit's run and after a hand form = the same change."""
    found: dict[str, str] = {}
    p = {"packages": marks["packages_packages"], "candidates": marks["ml_candidates"],
         "experiments": marks["ml_experiments"], "models": marks["ml_models"]}
    if milestone == "milestone-1":
        found["packages_packages.package_type"] = _md5(
            conn, "SELECT id || ':' || package_type FROM packages_packages WHERE id <= :packages", p)
    if milestone in ("milestone-2", "milestone-3", "milestone-4"):
        model = "c.model_id" if catalog.column_exists(conn, "ml_candidates", "model_id") else "NULL::bigint"
        found["ml_candidates.model"] = _md5(conn, f"""
            SELECT c.id || ':' || COALESCE(m.project_id || '/' || m.name, '-')
            FROM ml_candidates c LEFT JOIN ml_models m ON m.id = {model} WHERE c.id <= :candidates""", p)
    if milestone == "milestone-3":
        display = "display_name" if catalog.column_exists(conn, "ml_models", "display_name") else "NULL"
        found["ml_models"] = _md5(conn, f"""
            SELECT project_id || '/' || name || ':' || COALESCE({display}, '-') || ':' || created_at
            FROM ml_models WHERE id <= :models OR id IN (
                SELECT model_id FROM ml_experiments WHERE id <= :experiments)""", p)
        found["ml_experiments.model"] = _md5(conn, """
            SELECT e.id || ':' || COALESCE(m.project_id || '/' || m.name, '-')
            FROM ml_experiments e LEFT JOIN ml_models m ON m.id = e.model_id WHERE e.id <= :experiments""", p)
        found["ml_model_metadata"] = _md5(conn, """
            SELECT m.project_id || '/' || m.name || ':' || mm.name || '=' || mm.value
            FROM ml_model_metadata mm JOIN ml_models m ON m.id = mm.model_id""", p)
    if milestone in ("milestone-2", "milestone-4"):
        found["schema"] = _md5(conn, """
            SELECT table_name || '.' || column_name || ':' || is_nullable FROM information_schema.columns
            WHERE table_schema = 'public' AND table_name LIKE 'ml\\_%'""", p)
        found["indexes"] = _md5(conn, """
            SELECT c.relname || ':' || i.indisvalid || ':' || i.indisunique FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
            JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE n.nspname = 'public' AND t.relname LIKE 'ml\\_%'""", p)
        found["constraints"] = _md5(conn, """
            SELECT conrelid::regclass || '.' || conname || ':' || convalidated FROM pg_constraint
            WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text LIKE 'ml\\_%'""", p)
    if milestone == "milestone-4":
        found["tables"] = ",".join(t for t in ("ml_experiments", "ml_experiment_metadata")
                                   if catalog.relation_exists(conn, t))
    return found
