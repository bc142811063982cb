"""Milestone 4's steps before the drops: record the DDL, archive the rows, check the
archive, make ``ml_candidates.model_id`` NOT NULL. Each has its own plan, verify,
remaining and backward; :mod:`.drop` holds the drops and the rebuild.

Their verify is empty on purpose: once milestone 4 verifies, ``toolkit archive drop`` may
clear the archive and the recorded DDL, and milestone 4 must still verify after that.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine.actions import Action
from toolkit.engine.catalog_checks import index_valid, remedy
from toolkit.engine.ddl import PythonBody, Statements
from toolkit.engine.results import Check, StepPlan
from toolkit.engine.step import KeysetPass, Step
from toolkit.milestones.m4 import NAME, archive, capture
from toolkit.names import (
    M4_ARCHIVE_EXPERIMENTS,
    M4_ARCHIVE_METADATA,
    M4_ARCHIVED_DDL,
    M4_DROPPED_COLUMN,
    M4_MODEL_ID_CHECK,
    M4_SYNC_TRIGGER,
    M4_UNIQUE_INDEX,
)

EXPERIMENTS_GONE = catalog.relation_gone_sql("ml_experiments")
COLUMN_GONE = catalog.column_gone_sql(*M4_DROPPED_COLUMN)
MODEL_ID_NOT_NULL = catalog.column_not_null_sql("ml_candidates", "model_id")


def schema_plan(step: Step, done: bool) -> StepPlan:
    """The plan of a step that changes no rows: whether it is already done, and its SQL."""
    return StepPlan(step=step.name, description=step.description, rows=0,
                    context={"schema change already applied": int(done)}, sql=step.forward_sql(),
                    kind="schema")


class CaptureDdl(Step):
    name = "capture-ddl"
    description = "record, from the catalog, the DDL of everything milestone 4 drops"
    unit = "schema changes"

    def forward(self) -> list[Action]:
        return [PythonBody(
            "capture-ddl", "record the DDL of everything to be dropped",
            f"SELECT EXISTS (SELECT 1 FROM {M4_ARCHIVED_DDL}) OR to_regclass('ml_experiments') IS NULL",
            body=capture.record,
            outcome="recorded the DDL of the tables, triggers and functions to be dropped")]

    def backward(self) -> list[Action]:
        return [Statements("forget-ddl", "clear the recorded DDL (the rebuild is done)",
                           f"SELECT NOT EXISTS (SELECT 1 FROM {M4_ARCHIVED_DDL})",
                           (f"DELETE FROM {M4_ARCHIVED_DDL}",))]

    def _recorded(self, conn: Connection) -> bool:
        return bool(capture.recorded(conn, "tables"))

    def plan(self, conn: Connection) -> StepPlan:
        return schema_plan(self, self._recorded(conn) or not catalog.relation_exists(conn, "ml_experiments"))

    def remaining(self, conn: Connection) -> int:
        return 0


class ArchiveRows(Step):
    name = "archive-rows"
    description = ("archive ml_experiments, ml_experiment_metadata and each candidate's experiment_id, "
                   "kept in sync while GitLab writes")
    unit = "rows"  # what the batches copy into the archive; status and plan count them alike

    def forward(self) -> list[Action]:
        return [
            Statements("create-archive", "archive tables LIKE the live ones",
                       catalog.relation_exists_sql(M4_ARCHIVE_METADATA), archive.CREATE_ARCHIVES),
            Statements("archive-sync-triggers", "keep the archive in sync while GitLab writes",
                       f"SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '{M4_SYNC_TRIGGER}') "
                       "OR to_regclass('ml_experiments') IS NULL",
                       archive.SYNC_TRIGGERS,
                       tables=("ml_experiments", "ml_experiment_metadata", "ml_candidates")),
            KeysetPass("archive-ml-experiments", "copy ml_experiments to the archive", "ml_experiments",
                       archive.copy_sql("ml_experiments", M4_ARCHIVE_EXPERIMENTS),
                       skip_if_sql=EXPERIMENTS_GONE),
            KeysetPass("archive-ml-experiment-metadata", "copy ml_experiment_metadata to the archive",
                       "ml_experiment_metadata",
                       archive.copy_sql("ml_experiment_metadata", M4_ARCHIVE_METADATA),
                       skip_if_sql=catalog.relation_gone_sql("ml_experiment_metadata")),
            KeysetPass("archive-candidate-experiments", "copy each candidate's experiment_id",
                       "ml_candidates", archive.COPY_CANDIDATE_EXPERIMENTS, skip_if_sql=COLUMN_GONE),
        ]

    def backward(self) -> list[Action]:
        return [PythonBody(
            "forget-archive", "check the rebuild against the archive, then clear it",
            catalog.relation_gone_sql(M4_ARCHIVE_EXPERIMENTS),
            body=lambda conn: archive.clear(conn, check_rebuild=True),
            outcome="the rebuilt tables match the archive; archive cleared")]

    def plan(self, conn: Connection) -> StepPlan:
        counts = archive.left_to_archive(conn)
        return StepPlan(step=self.name, description=self.description, rows=sum(counts.values()),
                        breakdown=counts, sql=self.forward_sql())

    def remaining(self, conn: Connection) -> int:
        return sum(archive.left_to_archive(conn).values())


class CheckArchive(Step):
    name = "check-archive"
    description = "compare source and archive row for row (count, hash) before anything is dropped"
    unit = "checks"

    def forward(self) -> list[Action]:
        return [PythonBody(
            "check-archive", "compare source and archive row for row (count, hash)",
            COLUMN_GONE,  # the drops come only after a passing check
            body=archive.check, outcome="the archive matches the source row for row")]

    def plan(self, conn: Connection) -> StepPlan:
        return StepPlan(step=self.name, description=self.description, rows=0, sql=self.forward_sql(),
                        kind="check")

    def remaining(self, conn: Connection) -> int:
        return 0


def _model_id_not_null_or(query: str) -> str:
    """Done when model_id is NOT NULL already (the last of these changes), or when ``query`` says so."""
    return f"SELECT ({MODEL_ID_NOT_NULL}) OR ({query})"


class ModelIdNotNull(Step):
    name = "model-id-not-null"
    description = ("ml_candidates.model_id NOT NULL without a long lock (CHECK NOT VALID, VALIDATE, "
                   "SET NOT NULL), and the run uniqueness (model_id, eid) built CONCURRENTLY")
    unit = "schema changes"

    def forward(self) -> list[Action]:
        candidates = ("ml_candidates",)
        return [
            Statements("model-id-check", f"{M4_MODEL_ID_CHECK} CHECK (model_id IS NOT NULL) NOT VALID",
                       _model_id_not_null_or(catalog.constraint_exists_sql(M4_MODEL_ID_CHECK)),
                       (f"ALTER TABLE ml_candidates ADD CONSTRAINT {M4_MODEL_ID_CHECK} "
                        "CHECK (model_id IS NOT NULL) NOT VALID",), tables=candidates),
            Statements("model-id-validate", f"VALIDATE {M4_MODEL_ID_CHECK} (writes go on)",
                       _model_id_not_null_or(
                           catalog.constraint_exists_sql(M4_MODEL_ID_CHECK, validated=True)),
                       (f"ALTER TABLE ml_candidates VALIDATE CONSTRAINT {M4_MODEL_ID_CHECK}",),
                       tables=candidates),
            Statements("model-id-not-null", "SET NOT NULL (uses the validated CHECK: no scan)",
                       _model_id_not_null_or("SELECT false"),
                       ("ALTER TABLE ml_candidates ALTER COLUMN model_id SET NOT NULL",
                        f"ALTER TABLE ml_candidates DROP CONSTRAINT IF EXISTS {M4_MODEL_ID_CHECK}"),
                       tables=candidates),
            Statements(f"build-{M4_UNIQUE_INDEX}",
                       f"build {M4_UNIQUE_INDEX} CONCURRENTLY (an invalid leftover is rebuilt)",
                       catalog.index_valid_sql(M4_UNIQUE_INDEX),
                       (f"DROP INDEX CONCURRENTLY IF EXISTS {M4_UNIQUE_INDEX}",
                        f"CREATE UNIQUE INDEX CONCURRENTLY {M4_UNIQUE_INDEX} "
                        "ON ml_candidates USING btree (model_id, eid)"),
                       transactional=False, tables=candidates),
        ]

    def backward(self) -> list[Action]:
        return [
            Statements("drop-model-id-eid-index", f"drop {M4_UNIQUE_INDEX} CONCURRENTLY",
                       catalog.relation_gone_sql(M4_UNIQUE_INDEX),
                       (f"DROP INDEX CONCURRENTLY IF EXISTS {M4_UNIQUE_INDEX}",), transactional=False),
            Statements("model-id-nullable", "ml_candidates.model_id nullable again",
                       f"SELECT NOT ({MODEL_ID_NOT_NULL})",
                       ("ALTER TABLE ml_candidates ALTER COLUMN model_id DROP NOT NULL",
                        f"ALTER TABLE ml_candidates DROP CONSTRAINT IF EXISTS {M4_MODEL_ID_CHECK}")),
        ]

    def _done(self, conn: Connection) -> bool:
        return bool(catalog.column_not_null(conn, "ml_candidates", "model_id")) and bool(
            catalog.index_valid(conn, M4_UNIQUE_INDEX))

    def plan(self, conn: Connection) -> StepPlan:
        return schema_plan(self, self._done(conn))

    def remaining(self, conn: Connection) -> int:
        return 0

    def verify(self, conn: Connection) -> list[Check]:
        not_null = bool(catalog.column_not_null(conn, "ml_candidates", "model_id"))
        return [
            Check(name="ml_candidates.model_id is NOT NULL", ok=not_null, detail="yes" if not_null else "no",
                  remedy=remedy(not_null, NAME)),
            index_valid(conn, M4_UNIQUE_INDEX, NAME),
        ]


