"""Which GitLab tables a run's own transactions wrote, as PostgreSQL counted them.

Just before each commit of a run (the lease's commit hook calls :func:`record`),
``pg_stat_get_xact_tuples_inserted/updated/deleted`` give the rows *this transaction*
inserted, updated and deleted in each table, rows written by triggers it fired included.
They are added up per run in ``toolkit.run_writes``, in the same transaction as the
writes, so they commit together or not at all. A table that no run of a milestone wrote
is untouched by that milestone, however large it is: verify need not read it again
(verify/baselines.py).

The counters a backend reads are those it has not yet sent to the statistics system: this
transaction's, plus any of its earlier ones not flushed yet (PostgreSQL flushes at most
once a second). So the same statement asks for a flush as soon as the transaction ends
(``pg_stat_force_next_flush``, PostgreSQL 15 and later), and every commit of the run then
counts its own rows. (A transaction rolled back after a lock timeout is counted with the
next commit on its connection: a table the run tried to write counts as written.)

``track_counts`` off leaves the counters at zero. A run whose session had it off at any
commit is marked untracked (``runs.writes_tracked``), and verify then cannot use this
proof for that milestone; it says so.

Statements that commit by themselves (CREATE INDEX CONCURRENTLY) write no rows, so no
write escapes the hook.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.schema.own import SCHEMA

TRACKED_TABLES = ML_TABLE_NAMES  # what the fingerprint covers

_RECORD = sa.text(f"""
WITH counts AS (
    SELECT t AS table_name, pg_stat_get_xact_tuples_inserted(c.oid) AS inserted,
           pg_stat_get_xact_tuples_updated(c.oid) AS updated,
           pg_stat_get_xact_tuples_deleted(c.oid) AS deleted
    FROM unnest(CAST(:tables AS text[])) AS t JOIN pg_class c ON c.oid = to_regclass(t)
), recorded AS (
    INSERT INTO {SCHEMA}.run_writes AS w (run_id, table_name, inserted, updated, deleted)
    SELECT :run, table_name, inserted, updated, deleted FROM counts
    WHERE inserted + updated + deleted > 0
    ON CONFLICT (run_id, table_name) DO UPDATE
    SET inserted = w.inserted + EXCLUDED.inserted, updated = w.updated + EXCLUDED.updated,
        deleted = w.deleted + EXCLUDED.deleted
), untracked AS (
    UPDATE {SCHEMA}.runs SET writes_tracked = false
    WHERE id = :run AND writes_tracked AND NOT current_setting('track_counts')::boolean
)
SELECT pg_stat_force_next_flush()
""")


def start(conn: Connection, run_id: int) -> bool:
    """Whether the run's writes can be counted (PostgreSQL 15 or later, ``track_counts``
    on); if so, its commits start from a flushed count."""
    version = conn.execute(sa.text("SELECT current_setting('server_version_num')::int")).scalar_one()
    if version < 150000:
        return False
    tracked = conn.execute(sa.text(f"""
        UPDATE {SCHEMA}.runs SET writes_tracked = current_setting('track_counts')::boolean
        WHERE id = :r RETURNING writes_tracked"""), {"r": run_id}).scalar_one()
    conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
    return bool(tracked)


def record(conn: Connection, run_id: int) -> None:
    """Add this transaction's rows written, per GitLab table, to the run's record."""
    conn.execute(_RECORD, {"run": run_id, "tables": list(TRACKED_TABLES)})


def written_since(conn: Connection, milestone: str, first_run: int) -> dict[str, int] | None:
    """Rows written per GitLab table by the runs of ``milestone`` from ``first_run`` on
    (migrate and rollback alike); None when one of them was not tracked."""
    untracked = conn.execute(sa.text(f"""
        SELECT count(*) FROM {SCHEMA}.runs WHERE milestone = :m AND id >= :first AND NOT writes_tracked
    """), {"m": milestone, "first": first_run}).scalar_one()
    if untracked:
        return None
    return dict(conn.execute(sa.text(f"""
        SELECT w.table_name, sum(w.inserted + w.updated + w.deleted)::bigint
        FROM {SCHEMA}.run_writes w JOIN {SCHEMA}.runs r ON r.id = w.run_id
        WHERE r.milestone = :m AND r.id >= :first GROUP BY 1 ORDER BY 1
    """), {"m": milestone, "first": first_run}).all())
