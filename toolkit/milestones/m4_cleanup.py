"""Milestone 4: archive, then drop ``ml_experiments``, ``ml_experiment_metadata`` and
``ml_candidates.experiment_id``; a rollback rebuilds them exactly and restores every row.

Order of work (every step safe to run again after a crash):

1. capture the DDL of everything that will be dropped, from the catalog (:mod:`ddl_capture`);
2. create the archive tables (``LIKE`` the live ones) and triggers that keep them in sync
   while GitLab writes, then copy the rows in keyset batches (idempotent upserts);
3. compare source and archive, row for row (count and content hash): any difference stops
   the run before anything is dropped;
4. ``ml_candidates.model_id`` NOT NULL without a long lock (CHECK NOT VALID, VALIDATE,
   SET NOT NULL), and the run uniqueness ``(model_id, eid)`` built CONCURRENTLY;
5. drop the transition triggers, the column, then the two tables; each under
   lock_timeout with retries.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine.catalog_checks import index_valid
from toolkit.engine.ddl import SqlDdlAction
from toolkit.engine.listing import count_of, listed
from toolkit.engine.results import Check, StepPlan
from toolkit.engine.state import cleanup_started
from toolkit.engine.step import KeysetPass, Step
from toolkit.errors import VerificationFailed
from toolkit.milestones import ddl_capture
from toolkit.milestones.base import Milestone
from toolkit.verify.digest import table_digest

ARCHIVED_DDL = "toolkit.m4_archived_ddl"
ARCHIVE_EXPERIMENTS = "toolkit.m4_archive_ml_experiments"
ARCHIVE_METADATA = "toolkit.m4_archive_ml_experiment_metadata"
ARCHIVE_CANDIDATES = "toolkit.m4_archive_candidate_experiments"
NOT_NULL_CHECK = "check_ml_candidates_model_id_not_null"
UNIQUE_INDEX = "index_ml_candidates_on_model_id_and_eid"
SYNC = "toolkit_m4_archive_sync"

COLUMN_GONE = (
    "SELECT NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass "
    "AND attname = 'experiment_id' AND NOT attisdropped)"
)
ARCHIVES = {  # source table -> its archive
    "ml_experiments": ARCHIVE_EXPERIMENTS,
    "ml_experiment_metadata": ARCHIVE_METADATA,
}


def _exists(conn: Connection, relation: str) -> bool:
    return conn.execute(sa.text("SELECT to_regclass(:r) IS NOT NULL"), {"r": relation}).scalar_one()


def _column_exists(conn: Connection, table: str, column: str) -> bool:
    return conn.execute(
        sa.text(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(:t) "
            "AND attname = :c AND NOT attisdropped)"
        ),
        {"t": table, "c": column},
    ).scalar_one()


def _rows(conn: Connection, sql: str, **params: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]


# -- 1. capture ---------------------------------------------------------------------------
def capture_ddl(conn: Connection) -> None:
    conn.execute(sa.text(f"DELETE FROM {ARCHIVED_DDL}"))
    for ordinal, statement in enumerate(ddl_capture.capture(conn), start=1):
        conn.execute(
            sa.text(f"INSERT INTO {ARCHIVED_DDL} (ordinal, phase, statement) VALUES (:o, :p, :s)"),
            {"o": ordinal, "p": statement.phase, "s": statement.sql},
        )
    conn.commit()


def archived_statements(conn: Connection, *phases: str) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            sa.text(f"SELECT statement FROM {ARCHIVED_DDL} WHERE phase = ANY(:p) ORDER BY ordinal"),
            {"p": list(phases)},
        )
    ]


# -- 2. archive tables, sync triggers, copy -------------------------------------------------
CREATE_ARCHIVES = (
    f"CREATE TABLE IF NOT EXISTS {ARCHIVE_EXPERIMENTS} (LIKE ml_experiments, PRIMARY KEY (id))",
    f"CREATE TABLE IF NOT EXISTS {ARCHIVE_METADATA} (LIKE ml_experiment_metadata, PRIMARY KEY (id))",
)


# Rows GitLab writes between the copy and the drop reach the archive through these.
def _sync_table(source: str, archive: str) -> tuple[str, str]:
    function = f"""CREATE OR REPLACE FUNCTION toolkit.{SYNC}_{source}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
IF TG_OP = 'DELETE' THEN
  DELETE FROM {archive} WHERE id = OLD.id;
  RETURN OLD;
END IF;
DELETE FROM {archive} WHERE id = NEW.id;
INSERT INTO {archive} SELECT NEW.*;
RETURN NEW;
END
$$"""
    trigger = (
        f"CREATE TRIGGER {SYNC} AFTER INSERT OR UPDATE OR DELETE ON {source} "
        f"FOR EACH ROW EXECUTE FUNCTION toolkit.{SYNC}_{source}()"
    )
    return function, trigger


SYNC_CANDIDATES_FUNCTION = f"""CREATE OR REPLACE FUNCTION toolkit.{SYNC}_ml_candidates() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
IF TG_OP = 'DELETE' THEN
  DELETE FROM {ARCHIVE_CANDIDATES} WHERE candidate_id = OLD.id;
  RETURN OLD;
END IF;
INSERT INTO {ARCHIVE_CANDIDATES} (candidate_id, experiment_id) VALUES (NEW.id, NEW.experiment_id)
ON CONFLICT (candidate_id) DO UPDATE SET experiment_id = EXCLUDED.experiment_id;
RETURN NEW;
END
$$"""
SYNC_TRIGGERS = (
    *_sync_table("ml_experiments", ARCHIVE_EXPERIMENTS),
    *_sync_table("ml_experiment_metadata", ARCHIVE_METADATA),
    SYNC_CANDIDATES_FUNCTION,
    f"CREATE TRIGGER {SYNC} AFTER INSERT OR UPDATE OF experiment_id OR DELETE ON ml_candidates "
    f"FOR EACH ROW EXECUTE FUNCTION toolkit.{SYNC}_ml_candidates()",
)


def _copy_sql(source: str, target: str) -> str:
    """Rows of ``source`` in the batch's id range into ``target``; idempotent (archive and restore)."""
    return f"""
WITH copied AS (
    INSERT INTO {target} SELECT * FROM {source} WHERE id > :lo AND id <= :hi
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM copied"""


COPY_CANDIDATE_EXPERIMENTS = f"""
WITH copied AS (
    INSERT INTO {ARCHIVE_CANDIDATES} (candidate_id, experiment_id)
    SELECT id, experiment_id FROM ml_candidates WHERE id > :lo AND id <= :hi
    ON CONFLICT (candidate_id) DO UPDATE SET experiment_id = EXCLUDED.experiment_id
    RETURNING 1
)
SELECT count(*) FROM copied"""


def _left_to_archive(conn: Connection) -> dict[str, int]:
    """Rows of each source the archive does not hold yet (all of them before it exists)."""
    counts = {}
    sources = (("ml_experiments", ARCHIVE_EXPERIMENTS, "id", "ml_experiments rows to archive"),
               ("ml_experiment_metadata", ARCHIVE_METADATA, "id", "ml_experiment_metadata rows to archive"))
    for source, archive, key, label in sources:
        if _exists(conn, source):
            missing = (f" WHERE NOT EXISTS (SELECT 1 FROM {archive} a WHERE a.{key} = s.id)"
                       if _exists(conn, archive) else "")
            counts[label] = conn.execute(sa.text(f"SELECT count(*) FROM {source} s{missing}")).scalar_one()
    if _column_exists(conn, "ml_candidates", "experiment_id"):
        missing = (f" WHERE NOT EXISTS (SELECT 1 FROM {ARCHIVE_CANDIDATES} a WHERE a.candidate_id = s.id)"
                   if _exists(conn, ARCHIVE_CANDIDATES) else "")
        counts["candidate experiment_ids to archive"] = conn.execute(
            sa.text(f"SELECT count(*) FROM ml_candidates s{missing}")).scalar_one()
    return counts


# -- 3. check -----------------------------------------------------------------------------
def archive_differences(conn: Connection, *, rebuilt: bool = False) -> list[str]:
    """Row for row: count and content hash of each source against its archive.

    Both sides must be read in one snapshot: GitLab keeps writing, and under READ COMMITTED
    a commit between two statements would make them differ (the benchmark's writer did).
    So this must be the first thing its transaction does (SQLAlchemy refuses the setting
    inside a transaction already begun).
    """
    conn.execution_options(isolation_level="REPEATABLE READ")
    problems = []
    for source, archive in ARCHIVES.items():
        live, kept = table_digest(conn, source), table_digest(conn, archive)
        if (live.rows, live.digest) != (kept.rows, kept.digest):
            problems.append(
                f"{source}: {live.rows} rows (hash {live.digest[:12]}) but the archive has "
                f"{kept.rows} (hash {kept.digest[:12]})"
            )
    if rebuilt:
        # After a rollback, candidates GitLab wrote after the cleanup are not in the archive
        # (they got their model's default experiment); every archived one must be as it was.
        differ = conn.execute(sa.text(
            f"SELECT count(*) FROM {ARCHIVE_CANDIDATES} a JOIN ml_candidates c ON c.id = a.candidate_id "
            "WHERE c.experiment_id IS DISTINCT FROM a.experiment_id")).scalar_one()
        if differ:
            problems.append(f"ml_candidates.experiment_id: {differ} candidates differ from the archive")
        return problems
    live = conn.execute(
        sa.text(
            "SELECT count(*), COALESCE(sum(hashtextextended("
            "id::text || ':' || experiment_id::text, 0)::numeric), 0) "
            "FROM ml_candidates"
        )
    ).one()
    kept = conn.execute(
        sa.text(
            f"SELECT count(*), COALESCE(sum(hashtextextended("
            f"candidate_id::text || ':' || experiment_id::text, 0)"
            f"::numeric), 0) FROM {ARCHIVE_CANDIDATES}"
        )
    ).one()
    if tuple(live) != tuple(kept):
        problems.append(
            f"ml_candidates.experiment_id: {live[0]} rows but the archive has {kept[0]} "
            "(or their hashes differ)"
        )
    return problems


def check_archive(conn: Connection) -> None:
    problems = archive_differences(conn)
    if problems:
        raise VerificationFailed(
            "The archive does not match the source, so nothing was dropped: " + "; ".join(problems),
            "run `toolkit migrate milestone-4` again (the copy resumes and catches up)",
            details={"differences": problems},
        )


# -- rollback: rebuild ------------------------------------------------------------------------
RESTORE_CANDIDATE_EXPERIMENTS = f"""
WITH restored AS (
    UPDATE ml_candidates c
    SET experiment_id = COALESCE(
        (SELECT a.experiment_id FROM {ARCHIVE_CANDIDATES} a WHERE a.candidate_id = c.id),
        (SELECT e.id FROM ml_experiments e WHERE e.model_id = c.model_id ORDER BY e.id LIMIT 1))
    WHERE c.id > :lo AND c.id <= :hi AND c.experiment_id IS NULL
    RETURNING 1
)
SELECT count(*) FROM restored"""


def _foreign_keys_not_valid(conn: Connection) -> list[str]:
    statements = []
    for statement in archived_statements(conn, "foreign_keys"):
        table, name = statement.split()[2], statement.split()[5]
        statements.append(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
        statements.append(statement if statement.endswith("NOT VALID") else f"{statement} NOT VALID")
    return statements


def _validate_foreign_keys(conn: Connection) -> list[str]:
    return [
        f"ALTER TABLE {s.split()[2]} VALIDATE CONSTRAINT {s.split()[5]}"
        for s in archived_statements(conn, "foreign_keys")
        if not s.endswith("NOT VALID")
    ]


def _functions_and_triggers(conn: Connection) -> list[str]:
    statements = archived_statements(conn, "functions")
    for trigger in archived_statements(conn, "triggers"):
        name, table = trigger.split()[2], trigger.split(" ON ", 1)[1].split()[0]
        statements += [f"DROP TRIGGER IF EXISTS {name} ON {table}", trigger]
    return statements


def _forget_archive(conn: Connection) -> None:
    forget_archive(conn, check=True)


def forget_archive(conn: Connection, *, check: bool) -> None:
    """Drop the archive; after a rollback, only once the rebuilt tables match it."""
    problems = archive_differences(conn, rebuilt=True) if check else []
    if problems:
        raise VerificationFailed(
            "After the rebuild, the tables do not match the archive: " + "; ".join(problems),
            "nothing was deleted from the archive; report this with `toolkit history` output",
        )
    for statement in (
        f"DROP TRIGGER IF EXISTS {SYNC} ON ml_experiments",
        f"DROP TRIGGER IF EXISTS {SYNC} ON ml_experiment_metadata",
        f"DROP TRIGGER IF EXISTS {SYNC} ON ml_candidates",
        f"DROP FUNCTION IF EXISTS toolkit.{SYNC}_ml_experiments()",
        f"DROP FUNCTION IF EXISTS toolkit.{SYNC}_ml_experiment_metadata()",
        f"DROP FUNCTION IF EXISTS toolkit.{SYNC}_ml_candidates()",
        f"DROP TABLE IF EXISTS {ARCHIVE_EXPERIMENTS}",
        f"DROP TABLE IF EXISTS {ARCHIVE_METADATA}",
        f"DELETE FROM {ARCHIVE_CANDIDATES}",
        f"DELETE FROM {ARCHIVED_DDL}",
    ):
        conn.execute(sa.text(statement))
    conn.commit()


def _index_valid_sql(name: str) -> str:
    return (
        f"SELECT COALESCE((SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('{name}')), false)"
    )


def _drop_invalid_then(name: str, create: str) -> SqlDdlAction:
    """A CONCURRENTLY build that drops an INVALID leftover of an interrupted build first."""
    return SqlDdlAction(
        f"build-{name}",
        f"build {name} CONCURRENTLY (an invalid leftover is rebuilt)",
        _index_valid_sql(name),
        (f"DROP INDEX CONCURRENTLY IF EXISTS {name}", create),
        transactional=False,
        tables=("ml_candidates",),
    )


class ArchiveAndDrop(Step):
    name = "archive-and-drop"
    description = (
        "archive ml_experiments, ml_experiment_metadata and each candidate's experiment_id, "
        "check the archive row for row, then drop them"
    )

    def forward(self) -> list[Any]:
        experiments_present = "SELECT to_regclass('ml_experiments') IS NULL"
        return [
            SqlDdlAction(
                "capture-ddl",
                "record the DDL of everything to be dropped",
                f"SELECT EXISTS (SELECT 1 FROM {ARCHIVED_DDL}) OR to_regclass('ml_experiments') IS NULL",
                statements_from=lambda conn: [],
                run=capture_ddl,
                outcome="recorded the DDL of the tables, triggers and functions to be dropped",
            ),
            SqlDdlAction(
                "create-archive",
                "archive tables LIKE the live ones",
                f"SELECT to_regclass('{ARCHIVE_METADATA}') IS NOT NULL",
                CREATE_ARCHIVES,
            ),
            SqlDdlAction(
                "archive-sync-triggers",
                "keep the archive in sync while GitLab writes",
                f"SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '{SYNC}') "
                "OR to_regclass('ml_experiments') IS NULL",
                SYNC_TRIGGERS,
                tables=("ml_experiments", "ml_experiment_metadata", "ml_candidates"),
            ),
            KeysetPass(
                "archive-ml-experiments",
                "copy ml_experiments to the archive",
                "ml_experiments",
                _copy_sql("ml_experiments", ARCHIVE_EXPERIMENTS),
                skip_if_sql=experiments_present,
            ),
            KeysetPass(
                "archive-ml-experiment-metadata",
                "copy ml_experiment_metadata to the archive",
                "ml_experiment_metadata",
                _copy_sql("ml_experiment_metadata", ARCHIVE_METADATA),
                skip_if_sql="SELECT to_regclass('ml_experiment_metadata') IS NULL",
            ),
            KeysetPass(
                "archive-candidate-experiments",
                "copy each candidate's experiment_id",
                "ml_candidates",
                COPY_CANDIDATE_EXPERIMENTS,
                skip_if_sql=COLUMN_GONE,
            ),
            SqlDdlAction(
                "check-archive",
                "compare source and archive row for row (count, hash)",
                COLUMN_GONE,  # the drops come only after a passing check
                run=check_archive,
                outcome="the archive matches the source row for row",
            ),
            SqlDdlAction(
                "model-id-check",
                f"{NOT_NULL_CHECK} CHECK (model_id IS NOT NULL) NOT VALID",
                _model_id_not_null_or(
                    f"EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{NOT_NULL_CHECK}')"
                ),
                (
                    f"ALTER TABLE ml_candidates ADD CONSTRAINT {NOT_NULL_CHECK} "
                    "CHECK (model_id IS NOT NULL) NOT VALID",
                ),
                tables=("ml_candidates",),
            ),
            SqlDdlAction(
                "model-id-validate",
                f"VALIDATE {NOT_NULL_CHECK} (writes go on)",
                _model_id_not_null_or(
                    f"EXISTS (SELECT 1 FROM pg_constraint WHERE conname = "
                    f"'{NOT_NULL_CHECK}' AND convalidated)"
                ),
                (f"ALTER TABLE ml_candidates VALIDATE CONSTRAINT {NOT_NULL_CHECK}",),
                tables=("ml_candidates",),
            ),
            SqlDdlAction(
                "model-id-not-null",
                "SET NOT NULL (uses the validated CHECK: no scan)",
                _model_id_not_null_or("false"),
                (
                    "ALTER TABLE ml_candidates ALTER COLUMN model_id SET NOT NULL",
                    f"ALTER TABLE ml_candidates DROP CONSTRAINT IF EXISTS {NOT_NULL_CHECK}",
                ),
                tables=("ml_candidates",),
            ),
            _drop_invalid_then(
                UNIQUE_INDEX,
                f"CREATE UNIQUE INDEX CONCURRENTLY {UNIQUE_INDEX} "
                "ON ml_candidates USING btree (model_id, eid)",
            ),
            SqlDdlAction(
                "drop-transition-triggers",
                "remove milestone 2's and 3's transition triggers",
                "SELECT NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname IN "
                "('trigger_ml_candidates_model_id_transition', "
                "'trigger_ml_models_display_name_transition'))",
                (
                    "DROP TRIGGER IF EXISTS trigger_ml_candidates_model_id_transition ON ml_candidates",
                    "DROP FUNCTION IF EXISTS trigger_ml_candidates_model_id_transition()",
                    "DROP TRIGGER IF EXISTS trigger_ml_models_display_name_transition ON ml_models",
                    "DROP FUNCTION IF EXISTS trigger_ml_models_display_name_transition()",
                ),
                tables=("ml_candidates", "ml_models"),
            ),
            SqlDdlAction(
                "drop-candidates-experiment-id",
                "drop ml_candidates.experiment_id",
                "SELECT NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass "
                "AND attname = 'experiment_id' AND NOT attisdropped)",
                (
                    f"DROP TRIGGER IF EXISTS {SYNC} ON ml_candidates",
                    "ALTER TABLE ml_candidates DROP COLUMN IF EXISTS experiment_id",
                ),
                tables=("ml_candidates",),
            ),
            SqlDdlAction(
                "drop-ml-experiment-metadata",
                "drop ml_experiment_metadata",
                "SELECT to_regclass('ml_experiment_metadata') IS NULL",
                (
                    "DROP TABLE IF EXISTS ml_experiment_metadata",
                    "DROP FUNCTION IF EXISTS trigger_2b8fdc9b4a4e()",
                ),
                tables=("ml_experiment_metadata",),
            ),
            SqlDdlAction(
                "drop-ml-experiments",
                "drop ml_experiments",
                experiments_present,
                ("DROP TABLE IF EXISTS ml_experiments",),
                tables=("ml_experiments",),
            ),
        ]

    def backward(self) -> list[Any]:
        restored = (
            "SELECT to_regclass('ml_experiments') IS NOT NULL "
            "AND to_regclass('ml_experiment_metadata') IS NOT NULL"
        )
        column_back = (
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass "
            "AND attname = 'experiment_id' AND NOT attisdropped)"
        )
        not_null_back = (
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass "
            "AND attname = 'experiment_id' AND NOT attisdropped"
        )
        return [
            SqlDdlAction(
                "rebuild-tables",
                "recreate sequences, tables and primary keys from the archive",
                restored,
                statements_from=lambda c: archived_statements(
                    c, "sequences", "tables", "owned_by", "primary_keys"
                ),
            ),
            KeysetPass(
                "restore-ml-experiments",
                "restore ml_experiments rows",
                ARCHIVE_EXPERIMENTS,
                _copy_sql(ARCHIVE_EXPERIMENTS, "ml_experiments"),
            ),
            KeysetPass(
                "restore-ml-experiment-metadata",
                "restore ml_experiment_metadata rows",
                ARCHIVE_METADATA,
                _copy_sql(ARCHIVE_METADATA, "ml_experiment_metadata"),
            ),
            SqlDdlAction(
                "rebuild-constraints-and-indexes",
                "sequence positions, constraints, indexes",
                "SELECT to_regclass('index_ml_experiments_on_project_id_and_iid') IS NOT NULL",
                statements_from=lambda c: archived_statements(c, "setval", "constraints", "indexes"),
            ),
            SqlDdlAction(
                "rebuild-candidates-experiment-id",
                "add ml_candidates.experiment_id back",
                column_back,
                statements_from=lambda c: archived_statements(c, "candidate_column"),
            ),
            KeysetPass(
                "restore-candidate-experiments",
                "restore each candidate's experiment_id",
                "ml_candidates",
                RESTORE_CANDIDATE_EXPERIMENTS,
            ),
            SqlDdlAction(
                "experiment-id-check",
                "CHECK (experiment_id IS NOT NULL) NOT VALID",
                f"SELECT ({not_null_back}) OR EXISTS (SELECT 1 FROM pg_constraint "
                "WHERE conname = 'check_ml_candidates_experiment_id_not_null')",
                (
                    "ALTER TABLE ml_candidates ADD CONSTRAINT check_ml_candidates_experiment_id_not_null "
                    "CHECK (experiment_id IS NOT NULL) NOT VALID",
                ),
            ),
            SqlDdlAction(
                "experiment-id-validate",
                "VALIDATE it (writes go on)",
                f"SELECT ({not_null_back}) OR EXISTS (SELECT 1 FROM pg_constraint WHERE conname = "
                "'check_ml_candidates_experiment_id_not_null' AND convalidated)",
                ("ALTER TABLE ml_candidates VALIDATE CONSTRAINT check_ml_candidates_experiment_id_not_null",),
            ),
            SqlDdlAction(
                "experiment-id-not-null",
                "SET NOT NULL as it was",
                not_null_back,
                statements_from=lambda c: [
                    *archived_statements(c, "candidate_not_null"),
                    "ALTER TABLE ml_candidates DROP CONSTRAINT IF EXISTS "
                    "check_ml_candidates_experiment_id_not_null",
                ],
            ),
            SqlDdlAction(
                "rebuild-candidate-indexes",
                "indexes on experiment_id, CONCURRENTLY",
                "SELECT to_regclass('index_ml_candidates_on_experiment_id_and_eid') IS NOT NULL",
                transactional=False,
                statements_from=lambda c: archived_statements(c, "candidate_indexes"),
            ),
            SqlDdlAction(
                "rebuild-foreign-keys",
                "foreign keys, NOT VALID first",
                "SELECT false",
                statements_from=_foreign_keys_not_valid,
            ),
            SqlDdlAction(
                "validate-foreign-keys",
                "VALIDATE them as they were (writes go on)",
                "SELECT false",
                statements_from=_validate_foreign_keys,
            ),
            SqlDdlAction(
                "rebuild-triggers",
                "trigger functions and triggers, transition triggers included",
                "SELECT false",
                statements_from=_functions_and_triggers,
            ),
            SqlDdlAction(
                "drop-model-id-eid-index",
                f"drop {UNIQUE_INDEX} CONCURRENTLY",
                f"SELECT to_regclass('{UNIQUE_INDEX}') IS NULL",
                (f"DROP INDEX CONCURRENTLY IF EXISTS {UNIQUE_INDEX}",),
                transactional=False,
            ),
            SqlDdlAction(
                "model-id-nullable",
                "ml_candidates.model_id nullable again",
                "SELECT NOT attnotnull FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass "
                "AND attname = 'model_id'",
                (
                    "ALTER TABLE ml_candidates ALTER COLUMN model_id DROP NOT NULL",
                    f"ALTER TABLE ml_candidates DROP CONSTRAINT IF EXISTS {NOT_NULL_CHECK}",
                ),
            ),
            SqlDdlAction(
                "forget-archive",
                "check the rebuild against the archive, then clear it",
                f"SELECT to_regclass('{ARCHIVE_EXPERIMENTS}') IS NULL",
                run=_forget_archive,
                outcome="the rebuilt tables match the archive; archive cleared",
            ),
        ]

    def plan(self, conn: Connection) -> StepPlan:
        counts = _left_to_archive(conn)
        return StepPlan(
            step=self.name,
            description=self.description,
            rows=sum(counts.values()),
            breakdown=counts,
            context={},
            anomalies=[],
            sql=self.forward_sql(),
        )

    # Rows are what the batches copy into the archive; status and plan count them alike.
    unit = "rows"
    schema_changes = 3  # two tables and a column dropped

    def remaining(self, conn: Connection) -> int:
        return sum(_left_to_archive(conn).values())

    def schema_changes_left(self, conn: Connection) -> int:
        return (
            int(_exists(conn, "ml_experiments"))
            + int(_exists(conn, "ml_experiment_metadata"))
            + int(_column_exists(conn, "ml_candidates", "experiment_id"))
        )

    def verify(self, conn: Connection) -> list[Check]:
        gone = [name for name in ("ml_experiments", "ml_experiment_metadata") if not _exists(conn, name)]
        column_gone = not _column_exists(conn, "ml_candidates", "experiment_id")
        not_null = conn.execute(
            sa.text(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass "
                "AND attname = 'model_id'"
            )
        ).scalar()
        leftovers = _rows(
            conn,
            """
            SELECT tgname FROM pg_trigger WHERE tgname IN ('trigger_ml_candidates_model_id_transition',
                'trigger_ml_models_display_name_transition', :sync)""",
            sync=SYNC,
        )
        return [
            Check(
                name="ml_experiments and ml_experiment_metadata dropped",
                ok=len(gone) == 2,
                detail="dropped" if len(gone) == 2 else f"still present: {sorted(set(ARCHIVES) - set(gone))}",
                remedy=None if len(gone) == 2 else "run `toolkit migrate milestone-4`",
            ),
            Check(
                name="ml_candidates.experiment_id dropped",
                ok=column_gone,
                detail="dropped" if column_gone else "present",
                remedy=None if column_gone else "run `toolkit migrate milestone-4`",
            ),
            Check(
                name="ml_candidates.model_id is NOT NULL",
                ok=bool(not_null),
                detail="yes" if not_null else "no",
                remedy=None if not_null else "run `toolkit migrate milestone-4`",
            ),
            index_valid(conn, UNIQUE_INDEX, "milestone-4"),
            Check(
                name="transition and sync triggers removed",
                ok=not leftovers,
                detail="removed" if not leftovers else f"left: {[r['tgname'] for r in leftovers]}",
                remedy=None if not leftovers else "run `toolkit migrate milestone-4`",
            ),
        ]


def preconditions(conn: Connection) -> list[Check]:
    """Milestones 1 and 2 verify too; no candidate without a model; nothing written since M3."""
    from toolkit import milestones as registry

    if cleanup_started(conn):
        return []  # a re-run: what was checked when it started still holds, the archive syncs the rest
    checks = []
    for name in ("milestone-1", "milestone-2"):
        failed = [c for c in registry.get(name).verify(conn) if not c.ok]
        checks.append(
            Check(
                name=f"precondition: {name} verifies",
                ok=not failed,
                detail=failed[0].detail if failed else "it does",
                remedy=f"run `toolkit verify {name}` and fix what it lists" if failed else None,
            )
        )
    if _column_exists(conn, "ml_candidates", "model_id"):
        orphans = listed(
            conn, "SELECT id AS candidate_id FROM ml_candidates WHERE model_id IS NULL ORDER BY id"
        )
        checks.append(
            Check(
                name="precondition: every candidate has a model_id",
                ok=not orphans,
                detail=f"{count_of(orphans)} candidates have none" if orphans else "all do",
                remedy="run `toolkit migrate milestone-3` again" if orphans else None,
                rows=orphans,
            )
        )
    finished = (
        conn.execute(
            sa.text(
                "SELECT COALESCE(verified_at, applied_at) FROM toolkit.milestones "
                "WHERE milestone = 'milestone-3'"
            )
        ).scalar()
        if _exists(conn, "toolkit.milestones")
        else None
    )
    if finished is not None:
        late = listed(
            conn,
            """
            SELECT 'ml_experiments' AS table_name, id FROM ml_experiments
            WHERE updated_at > :t OR created_at > :t
            UNION ALL
            SELECT 'ml_experiment_metadata', id FROM ml_experiment_metadata
            WHERE updated_at > :t OR created_at > :t
            ORDER BY 1, 2""",
            t=finished,
        )
        checks.append(
            Check(
                name="precondition: nothing written to experiments since milestone 3 finished",
                ok=not late,
                detail=f"{count_of(late)} rows written since {finished}: "
                + ", ".join(f"{r['table_name']} {r['id']}" for r in late[:10])
                if late
                else "nothing",
                remedy="run `toolkit migrate milestone-3` again so their models and metadata are current "
                "(and stop GitLab writing experiments), then retry"
                if late
                else None,
                rows=late,
            )
        )
    return checks


def _model_id_not_null_or(condition: str) -> str:
    return (
        "SELECT (SELECT attnotnull FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass "
        f"AND attname = 'model_id') OR {condition}"
    )


MILESTONE_4 = Milestone(
    name="milestone-4",
    number=4,
    title="Cleanup: archive, then drop ml_experiments, ml_experiment_metadata, candidates' experiment_id",
    steps=(ArchiveAndDrop(),),
    reads=("ml_candidates", "ml_models"),
    updates=("ml_candidates",),
    drops=("ml_experiments", "ml_experiment_metadata"),
    preconditions=preconditions,
    confirm=True,
)
