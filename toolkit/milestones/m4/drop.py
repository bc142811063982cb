"""Milestone 4's last step: drop the transition triggers, ``ml_candidates.experiment_id``,
then ``ml_experiment_metadata`` and ``ml_experiments``; each under lock_timeout with
retries. Its backward is the exact rebuild, replayed from the DDL :mod:`.capture`
recorded and the rows :mod:`.archive` kept.

``toolkit sql milestone-4 --rollback`` against a database where milestone 4 is applied
shows every statement the rebuild will run (the ``StoredStatements`` read them); without
one, it shows the query that yields them.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.catalog import literal
from toolkit.engine.actions import Action
from toolkit.engine.catalog_checks import remedy
from toolkit.engine.ddl import Statements, StoredStatements
from toolkit.engine.results import Check, StepPlan
from toolkit.engine.step import KeysetPass, Step
from toolkit.milestones.m4 import NAME, archive, capture
from toolkit.milestones.m4.steps import EXPERIMENTS_GONE, schema_plan
from toolkit.names import (
    M3_COPIED_METADATA,
    M3_CREATED_MODELS,
    M4_ARCHIVE_CANDIDATES,
    M4_ARCHIVE_EXPERIMENTS,
    M4_ARCHIVE_METADATA,
    M4_ARCHIVES,
    M4_DROPPED_COLUMN,
    M4_DROPPED_TABLES,
    M4_EXPERIMENT_ID_CHECK,
    M4_EXPERIMENT_IDS,
    M4_SYNC_TRIGGER,
    TRANSITION_TRIGGERS,
)

EXPERIMENT_ID_NOT_NULL = catalog.column_not_null_sql(*M4_DROPPED_COLUMN)

# In the transaction that drops ml_experiments, after taking the lock the DROP takes anyway
# (so an experiment GitLab is inserting meanwhile is either committed and copied, or waits
# and finds the table gone): what GitLab's MLflow API needs of each experiment, kept for good.
LOCK_EXPERIMENTS = "LOCK TABLE ml_experiments IN ACCESS EXCLUSIVE MODE"
KEEP_EXPERIMENT_IDS = f"""INSERT INTO {M4_EXPERIMENT_IDS}
    (id, project_id, iid, model_id, name, created_at, updated_at, deleted_on)
SELECT id, project_id, iid, model_id, name, created_at, updated_at, deleted_on FROM ml_experiments
ON CONFLICT (id) DO UPDATE SET project_id = EXCLUDED.project_id, iid = EXCLUDED.iid,
    model_id = EXCLUDED.model_id, name = EXCLUDED.name, created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at, deleted_on = EXCLUDED.deleted_on"""


def _stored(name: str, description: str, done_sql: str, *phases: str, transactional: bool = True,
            then: Callable[[Connection], list[str]] | None = None) -> StoredStatements:
    """A rebuild action whose statements are the recorded ones of ``phases`` (and ``then``'s)."""
    query, read = capture.statements(*phases)
    if then is not None:
        return StoredStatements(name, description, done_sql, lambda conn: [*read(conn), *then(conn)],
                                query, transactional)
    return StoredStatements(name, description, done_sql, read, query, transactional)


def _foreign_keys_not_valid(conn: Connection) -> list[str]:
    statements = []
    for fk in capture.recorded(conn, "foreign_keys"):
        statements.append(f"ALTER TABLE {fk.table} DROP CONSTRAINT IF EXISTS {fk.name}")
        statements.append(fk.sql if fk.sql.endswith("NOT VALID") else f"{fk.sql} NOT VALID")
    return statements


def _validate_foreign_keys(conn: Connection) -> list[str]:
    return [f"ALTER TABLE {fk.table} VALIDATE CONSTRAINT {fk.name}"
            for fk in capture.recorded(conn, "foreign_keys") if not fk.sql.endswith("NOT VALID")]


def _functions_and_triggers(conn: Connection) -> list[str]:
    statements = [s.sql for s in capture.recorded(conn, "functions")]
    for trigger in capture.recorded(conn, "triggers"):
        statements += [f"DROP TRIGGER IF EXISTS {trigger.name} ON {trigger.table}", trigger.sql]
    return statements


# Experiments MLflow clients made after milestone 4 (toolkit.mlflow_api.stages) are rows of
# the archive like the others; their tags are their models' metadata only (recorded as copied
# by milestone 3's ledger, run_id NULL), and become their experiment's tags again here.
LOCK_ARCHIVES = f"LOCK TABLE {M4_ARCHIVE_EXPERIMENTS}, {M4_ARCHIVE_METADATA} IN SHARE MODE"
ARCHIVE_TAGS_OF_MADE_SINCE = f"""
INSERT INTO {M4_ARCHIVE_METADATA} (id, created_at, updated_at, experiment_id, name, value, project_id)
SELECT nextval(CAST(:sequence AS regclass)), mm.created_at, mm.updated_at, x.id, mm.name, mm.value,
       mm.project_id
FROM {M4_ARCHIVE_EXPERIMENTS} x
JOIN {M3_CREATED_MODELS} l ON l.model_id = x.model_id AND l.experiment_id = x.id AND l.run_id IS NULL
JOIN ml_model_metadata mm ON mm.model_id = x.model_id
JOIN {M3_COPIED_METADATA} k ON k.model_metadata_id = mm.id
WHERE NOT EXISTS (SELECT 1 FROM {M4_ARCHIVE_METADATA} a WHERE a.experiment_id = x.id AND a.name = mm.name)
ORDER BY mm.id"""


def _past(sequence: str, relation: str) -> str:
    """Move ``sequence`` past the highest id of ``relation`` (never back)."""
    return (f"SELECT setval({literal(sequence)}, s.m) FROM (SELECT max(id) AS m FROM {relation}) s, "
            f"{sequence} q WHERE s.m > q.last_value OR (s.m = q.last_value AND NOT q.is_called)")


def _sequences_of(conn: Connection) -> dict[str, str]:
    return {s.table: s.name for s in capture.recorded(conn, "setval")}


def _experiments_made_since(conn: Connection) -> list[str]:
    """In the transaction that recreates the tables: wait for writes into the archive to
    commit (SHARE: they hold ROW EXCLUSIVE and, finding ``ml_experiments`` back once this
    commits, write nothing more there), set the new sequences past the archived ids (an
    experiment made after milestone 4 has an id past the recorded position, and GitLab's
    next insert must not take it), and give those experiments their tags back."""
    sequences = _sequences_of(conn)
    statements = [LOCK_ARCHIVES]
    statements += [_past(sequences[t], archived) for t, archived in M4_ARCHIVES.items() if t in sequences]
    if "ml_experiment_metadata" in sequences and catalog.relation_exists(conn, M3_COPIED_METADATA):
        statements.append(ARCHIVE_TAGS_OF_MADE_SINCE.replace(
            ":sequence", literal(sequences["ml_experiment_metadata"])))
    return statements


def _sequences_past_the_rows(conn: Connection) -> list[str]:
    """After the recorded positions: past the restored rows, whichever is further (the
    recorded position was read before the archive copied the last rows GitLab wrote)."""
    return [_past(sequence, table) for table, sequence in _sequences_of(conn).items()]


def _restore_count(archived: str, live: str, what: str) -> Callable[[Connection], dict[str, int]]:
    """rollback --dry-run: the archived rows the restore would copy back (those the live
    table, once rebuilt, does not hold yet)."""
    def count(conn: Connection) -> dict[str, int]:
        missing = (f" WHERE NOT EXISTS (SELECT 1 FROM {live} t WHERE t.id = a.id)"
                   if catalog.relation_exists(conn, live) else "")
        return {f"{what} restored from the archive": conn.execute(
            sa.text(f"SELECT count(*) FROM {archived} a{missing}")).scalar_one()}
    return count


def _candidate_experiments_count(conn: Connection) -> dict[str, int]:
    """rollback --dry-run: the candidates whose experiment_id the restore would set (all of
    them while the column is dropped): from the archive, or (candidates GitLab wrote since
    milestone 4) their model's default experiment."""
    still_null = (" WHERE c.experiment_id IS NULL"
                  if catalog.column_exists(conn, *M4_DROPPED_COLUMN) else "")
    total, archived = conn.execute(sa.text(f"""
        SELECT count(*), count(a.candidate_id) FROM ml_candidates c
        LEFT JOIN {M4_ARCHIVE_CANDIDATES} a ON a.candidate_id = c.id{still_null}""")).one()
    return {"candidates' experiment_id restored": total, "from the archive": archived,
            "their model's default experiment (candidates written since milestone 4)": total - archived}


_FOREIGN_KEYS_QUERY, _ = capture.statements("foreign_keys")
_TRIGGERS_QUERY, _ = capture.statements("functions", "triggers")


class DropLegacy(Step):
    name = "drop-legacy"
    description = ("drop the transition triggers, ml_candidates.experiment_id, ml_experiment_metadata "
                   "and ml_experiments")
    unit = "schema changes"

    def forward(self) -> list[Action]:
        names = tuple(trigger for _, trigger in TRANSITION_TRIGGERS)
        return [
            Statements("drop-transition-triggers", "remove milestone 2's and 3's transition triggers",
                       catalog.triggers_gone_sql(names),
                       tuple(s for table, trigger in TRANSITION_TRIGGERS for s in (
                           f"DROP TRIGGER IF EXISTS {trigger} ON {table}",
                           f"DROP FUNCTION IF EXISTS {trigger}()")),
                       tables=tuple(table for table, _ in TRANSITION_TRIGGERS)),
            Statements("drop-candidates-experiment-id", "drop ml_candidates.experiment_id",
                       catalog.column_gone_sql(*M4_DROPPED_COLUMN),
                       (f"DROP TRIGGER IF EXISTS {M4_SYNC_TRIGGER} ON ml_candidates",
                        "ALTER TABLE ml_candidates DROP COLUMN IF EXISTS experiment_id"),
                       tables=("ml_candidates",)),
            Statements("drop-ml-experiment-metadata", "drop ml_experiment_metadata",
                       catalog.relation_gone_sql("ml_experiment_metadata"),
                       ("DROP TABLE IF EXISTS ml_experiment_metadata",
                        "DROP FUNCTION IF EXISTS trigger_2b8fdc9b4a4e()"),
                       tables=("ml_experiment_metadata",)),
            Statements("drop-ml-experiments",
                       f"keep each experiment's MLflow id in {M4_EXPERIMENT_IDS}, then drop ml_experiments",
                       EXPERIMENTS_GONE,
                       (LOCK_EXPERIMENTS, KEEP_EXPERIMENT_IDS, "DROP TABLE IF EXISTS ml_experiments"),
                       tables=("ml_experiments",)),
        ]

    def backward(self) -> list[Action]:
        restored = " AND ".join(f"to_regclass('{t}') IS NOT NULL" for t in M4_DROPPED_TABLES)
        check_in_place = catalog.constraint_exists_sql(M4_EXPERIMENT_ID_CHECK)
        return [
            _stored("rebuild-tables", "recreate sequences, tables and primary keys from the archive",
                    f"SELECT {restored}", "sequences", "tables", "owned_by", "primary_keys",
                    then=_experiments_made_since),
            KeysetPass("restore-ml-experiments", "restore ml_experiments rows", M4_ARCHIVE_EXPERIMENTS,
                       archive.copy_sql(M4_ARCHIVE_EXPERIMENTS, "ml_experiments"),
                       count=_restore_count(M4_ARCHIVE_EXPERIMENTS, "ml_experiments", "ml_experiments rows")),
            KeysetPass("restore-ml-experiment-metadata", "restore ml_experiment_metadata rows",
                       M4_ARCHIVE_METADATA, archive.copy_sql(M4_ARCHIVE_METADATA, "ml_experiment_metadata"),
                       count=_restore_count(M4_ARCHIVE_METADATA, "ml_experiment_metadata",
                                            "ml_experiment_metadata rows")),
            _stored("rebuild-constraints-and-indexes", "sequence positions, constraints, indexes",
                    catalog.relation_exists_sql("index_ml_experiments_on_project_id_and_iid"),
                    "setval", "constraints", "indexes", then=_sequences_past_the_rows),
            _stored("rebuild-candidates-experiment-id", "add ml_candidates.experiment_id back",
                    catalog.column_exists_sql(*M4_DROPPED_COLUMN), "candidate_column"),
            KeysetPass("restore-candidate-experiments", "restore each candidate's experiment_id",
                       "ml_candidates", archive.RESTORE_CANDIDATE_EXPERIMENTS,
                       count=_candidate_experiments_count),
            Statements("experiment-id-check", "CHECK (experiment_id IS NOT NULL) NOT VALID",
                       f"SELECT ({EXPERIMENT_ID_NOT_NULL}) OR ({check_in_place})",
                       (f"ALTER TABLE ml_candidates ADD CONSTRAINT {M4_EXPERIMENT_ID_CHECK} "
                        "CHECK (experiment_id IS NOT NULL) NOT VALID",)),
            Statements("experiment-id-validate", "VALIDATE it (writes go on)",
                       f"SELECT ({EXPERIMENT_ID_NOT_NULL}) OR "
                       f"({catalog.constraint_exists_sql(M4_EXPERIMENT_ID_CHECK, validated=True)})",
                       (f"ALTER TABLE ml_candidates VALIDATE CONSTRAINT {M4_EXPERIMENT_ID_CHECK}",)),
            _stored("experiment-id-not-null", "SET NOT NULL as it was", EXPERIMENT_ID_NOT_NULL,
                    "candidate_not_null",
                    then=lambda conn: [f"ALTER TABLE ml_candidates DROP CONSTRAINT IF EXISTS "
                                       f"{M4_EXPERIMENT_ID_CHECK}"]),
            _stored("rebuild-candidate-indexes", "indexes on experiment_id, CONCURRENTLY",
                    catalog.relation_exists_sql("index_ml_candidates_on_experiment_id_and_eid"),
                    "candidate_indexes", transactional=False),
            StoredStatements("rebuild-foreign-keys", "foreign keys, NOT VALID first", "SELECT false",
                             _foreign_keys_not_valid, _FOREIGN_KEYS_QUERY),
            StoredStatements("validate-foreign-keys", "VALIDATE them as they were (writes go on)",
                             "SELECT false", _validate_foreign_keys, _FOREIGN_KEYS_QUERY),
            StoredStatements("rebuild-triggers",
                             "trigger functions and triggers, transition triggers included",
                             "SELECT false", _functions_and_triggers, _TRIGGERS_QUERY),
            Statements("forget-experiment-ids", f"empty {M4_EXPERIMENT_IDS} (the experiments are back)",
                       f"SELECT NOT EXISTS (SELECT 1 FROM {M4_EXPERIMENT_IDS})",
                       (f"DELETE FROM {M4_EXPERIMENT_IDS}",)),
        ]

    def plan(self, conn: Connection) -> StepPlan:
        return schema_plan(self, self.schema_changes_left(conn) == 0)

    def remaining(self, conn: Connection) -> int:
        return self.schema_changes_left(conn)

    def verify(self, conn: Connection) -> list[Check]:
        left = [t for t in M4_DROPPED_TABLES if catalog.relation_exists(conn, t)]
        column_gone = not catalog.column_exists(conn, *M4_DROPPED_COLUMN)
        leftovers = catalog.triggers_present(conn, (*(t for _, t in TRANSITION_TRIGGERS), M4_SYNC_TRIGGER))
        return [
            Check(name="ml_experiments and ml_experiment_metadata dropped", ok=not left,
                  detail="dropped" if not left else f"still present: {sorted(left)}",
                  remedy=remedy(not left, NAME)),
            Check(name="ml_candidates.experiment_id dropped", ok=column_gone,
                  detail="dropped" if column_gone else "present", remedy=remedy(column_gone, NAME)),
            Check(name="transition and sync triggers removed", ok=not leftovers,
                  detail="removed" if not leftovers else f"left: {leftovers}",
                  remedy=remedy(not leftovers, NAME)),
        ]

