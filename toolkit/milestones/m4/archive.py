"""Milestone 4's archive: its tables, how rows reach it, and how it is compared and cleared.

The names come from :mod:`toolkit.names`; ``toolkit archive`` and the fingerprint read the
archive through this module. The archived rows of ``ml_experiments`` and
``ml_experiment_metadata`` live in tables created ``LIKE`` the live ones, so they have
exactly this database's columns; each candidate's ``experiment_id`` lives in a pair table;
the DDL of everything dropped lives in ``toolkit.m4_archived_ddl`` (:mod:`.capture`).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.errors import VerificationFailed
from toolkit.milestones.m3_models_for_experiments import NAME as M3
from toolkit.milestones.m4 import NAME
from toolkit.names import (
    M4_ARCHIVE_CANDIDATES,
    M4_ARCHIVE_EXPERIMENTS,
    M4_ARCHIVE_METADATA,
    M4_ARCHIVED_DDL,
    M4_ARCHIVES,
    M4_DROPPED_COLUMN,
    M4_EXPERIMENT_IDS,
    M4_SYNC_TRIGGER,
)
from toolkit.verify.digest import table_digest

TABLES = (M4_ARCHIVE_EXPERIMENTS, M4_ARCHIVE_METADATA, M4_ARCHIVE_CANDIDATES, M4_ARCHIVED_DDL)

CREATE_ARCHIVES = tuple(
    f"CREATE TABLE IF NOT EXISTS {archive} (LIKE {source}, PRIMARY KEY (id))"
    for source, archive in M4_ARCHIVES.items()
)


def _sync_table(source: str, archive: str) -> tuple[str, str]:
    """Rows GitLab writes between the copy and the drop reach the archive through these."""
    function = f"""CREATE OR REPLACE FUNCTION toolkit.{M4_SYNC_TRIGGER}_{source}() RETURNS trigger
LANGUAGE plpgsql AS $$
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
        f"CREATE TRIGGER {M4_SYNC_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {source} "
        f"FOR EACH ROW EXECUTE FUNCTION toolkit.{M4_SYNC_TRIGGER}_{source}()"
    )
    return function, trigger


_SYNC_CANDIDATES_FUNCTION = f"""CREATE OR REPLACE FUNCTION toolkit.{M4_SYNC_TRIGGER}_ml_candidates()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
IF TG_OP = 'DELETE' THEN
  DELETE FROM {M4_ARCHIVE_CANDIDATES} WHERE candidate_id = OLD.id;
  RETURN OLD;
END IF;
INSERT INTO {M4_ARCHIVE_CANDIDATES} (candidate_id, experiment_id) VALUES (NEW.id, NEW.experiment_id)
ON CONFLICT (candidate_id) DO UPDATE SET experiment_id = EXCLUDED.experiment_id;
RETURN NEW;
END
$$"""
SYNC_TRIGGERS = (
    *(statement for source, archive in M4_ARCHIVES.items() for statement in _sync_table(source, archive)),
    _SYNC_CANDIDATES_FUNCTION,
    f"CREATE TRIGGER {M4_SYNC_TRIGGER} AFTER INSERT OR UPDATE OF experiment_id OR DELETE ON ml_candidates "
    f"FOR EACH ROW EXECUTE FUNCTION toolkit.{M4_SYNC_TRIGGER}_ml_candidates()",
)
_SYNCED = (*M4_ARCHIVES, "ml_candidates")
DROP_SYNC_TRIGGERS = (
    *(f"DROP TRIGGER IF EXISTS {M4_SYNC_TRIGGER} ON {table}" for table in _SYNCED),
    *(f"DROP FUNCTION IF EXISTS toolkit.{M4_SYNC_TRIGGER}_{table}()" for table in _SYNCED),
)


def copy_sql(source: str, target: str) -> str:
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
    INSERT INTO {M4_ARCHIVE_CANDIDATES} (candidate_id, experiment_id)
    SELECT id, experiment_id FROM ml_candidates WHERE id > :lo AND id <= :hi
    ON CONFLICT (candidate_id) DO UPDATE SET experiment_id = EXCLUDED.experiment_id
    RETURNING 1
)
SELECT count(*) FROM copied"""

RESTORE_CANDIDATE_EXPERIMENTS = f"""
WITH restored AS (
    UPDATE ml_candidates c
    SET experiment_id = COALESCE(
        (SELECT a.experiment_id FROM {M4_ARCHIVE_CANDIDATES} a WHERE a.candidate_id = c.id),
        (SELECT e.id FROM ml_experiments e WHERE e.model_id = c.model_id ORDER BY e.id LIMIT 1))
    WHERE c.id > :lo AND c.id <= :hi AND c.experiment_id IS NULL
    RETURNING 1
)
SELECT count(*) FROM restored"""


def left_to_archive(conn: Connection) -> dict[str, int]:
    """Rows of each source the archive does not hold yet (all of them before it exists)."""
    counts = {}
    for source, archive in M4_ARCHIVES.items():
        if catalog.relation_exists(conn, source):
            missing = (f" WHERE NOT EXISTS (SELECT 1 FROM {archive} a WHERE a.id = s.id)"
                       if catalog.relation_exists(conn, archive) else "")
            counts[f"{source} rows to archive"] = conn.execute(
                sa.text(f"SELECT count(*) FROM {source} s{missing}")).scalar_one()
    if catalog.column_exists(conn, *M4_DROPPED_COLUMN):
        missing = (f" WHERE NOT EXISTS (SELECT 1 FROM {M4_ARCHIVE_CANDIDATES} a WHERE a.candidate_id = s.id)"
                   if catalog.relation_exists(conn, M4_ARCHIVE_CANDIDATES) else "")
        counts["candidate experiment_ids to archive"] = conn.execute(
            sa.text(f"SELECT count(*) FROM ml_candidates s{missing}")).scalar_one()
    return counts


_CANDIDATE_PAIRS = ("SELECT count(*), COALESCE(sum(hashtextextended({id}::text || ':' || "
                    "experiment_id::text, 0)::numeric), 0) FROM {table}")


def differences(conn: Connection, *, rebuilt: bool = False) -> list[str]:
    """Row for row: count and content hash of each source against its archive.

    Both sides must be read in one snapshot: GitLab keeps writing, and under READ COMMITTED
    a commit between two statements would make them differ (the benchmark's writer did).
    So this must be the first thing its transaction does (SQLAlchemy refuses the setting
    inside a transaction already begun).
    """
    conn.execution_options(isolation_level="REPEATABLE READ")
    problems = []
    for source, archive in M4_ARCHIVES.items():
        live, kept = table_digest(conn, source), table_digest(conn, archive)
        if (live.rows, live.digest) != (kept.rows, kept.digest):
            problems.append(f"{source}: {live.rows} rows (hash {live.digest[:12]}) but the archive has "
                            f"{kept.rows} (hash {kept.digest[:12]})")
    if rebuilt:
        # After a rollback, candidates GitLab wrote after the cleanup are not in the archive
        # (they got their model's default experiment); every archived one must be as it was.
        differ = conn.execute(sa.text(
            f"SELECT count(*) FROM {M4_ARCHIVE_CANDIDATES} a JOIN ml_candidates c ON c.id = a.candidate_id "
            "WHERE c.experiment_id IS DISTINCT FROM a.experiment_id")).scalar_one()
        if differ:
            problems.append(f"ml_candidates.experiment_id: {differ} candidates differ from the archive")
        return problems
    pairs = conn.execute(sa.text(_CANDIDATE_PAIRS.format(id="id", table="ml_candidates"))).one()
    archived = conn.execute(sa.text(
        _CANDIDATE_PAIRS.format(id="candidate_id", table=M4_ARCHIVE_CANDIDATES))).one()
    if tuple(pairs) != tuple(archived):
        problems.append(f"ml_candidates.experiment_id: {pairs[0]} rows but the archive has {archived[0]} "
                        "(or their hashes differ)")
    return problems


def check(conn: Connection) -> None:
    """Refuse to go on to the drops unless the archive matches its sources row for row."""
    problems = differences(conn)
    if problems:
        raise VerificationFailed(
            "The archive does not match the source, so nothing was dropped: " + "; ".join(problems),
            f"run `toolkit migrate {NAME}` again (the copy resumes and catches up)",
            details={"differences": problems},
        )


def clear(conn: Connection, *, check_rebuild: bool) -> None:
    """Drop the archive's rows, tables and sync triggers; after a rollback, only once the
    rebuilt tables match it. The recorded DDL is :mod:`.capture`'s to forget."""
    problems = differences(conn, rebuilt=True) if check_rebuild else []
    if problems:
        raise VerificationFailed(
            "After the rebuild, the tables do not match the archive: " + "; ".join(problems),
            "nothing was deleted from the archive; report this with `toolkit history` output",
        )
    for statement in (*DROP_SYNC_TRIGGERS, *(f"DROP TABLE IF EXISTS {a}" for a in M4_ARCHIVES.values()),
                      f"DELETE FROM {M4_ARCHIVE_CANDIDATES}"):
        conn.execute(sa.text(statement))


# What `archive drop` copies before the archive goes: the ids of experiments milestone 4
# archived but a toolkit before 0008 never kept (it ran milestone 4 without that table).
KEEP_ARCHIVED_IDS = f"""INSERT INTO {M4_EXPERIMENT_IDS}
    (id, project_id, iid, model_id, name, created_at, updated_at, deleted_on)
SELECT id, project_id, iid, model_id, name, created_at, updated_at, deleted_on FROM {M4_ARCHIVE_EXPERIMENTS}
WHERE model_id IS NOT NULL ON CONFLICT (id) DO NOTHING"""
ARCHIVED_IDS_NOT_KEPT = f"""SELECT count(*) FROM {M4_ARCHIVE_EXPERIMENTS} a
WHERE NOT EXISTS (SELECT 1 FROM {M4_EXPERIMENT_IDS} k WHERE k.id = a.id)"""


def drop_everything(conn: Connection) -> None:
    """``toolkit archive drop``: the archive and the recorded DDL, for good; first every
    archived experiment's MLflow id is made sure to be kept, or nothing is dropped."""
    if catalog.relation_exists(conn, M4_ARCHIVE_EXPERIMENTS):
        conn.execute(sa.text(KEEP_ARCHIVED_IDS))
        if lost := conn.execute(sa.text(ARCHIVED_IDS_NOT_KEPT)).scalar_one():
            raise VerificationFailed(
                f"{lost} archived experiments have no model, so their MLflow ids could not be kept",
                f"nothing was dropped; `toolkit verify {M3}` names experiments without a model")
    clear(conn, check_rebuild=False)
    conn.execute(sa.text(f"DELETE FROM {M4_ARCHIVED_DDL}"))
