"""Milestone 3's rollback: the created models removed (unless GitLab has since given them
versions or metadata of their own), the metadata copied to existing models removed, the
recorded clashes forgotten; and, for ``rollback --dry-run``, what each pass would change."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.names import M3_COPIED_METADATA as COPIED
from toolkit.names import M3_CREATED_MODELS as CREATED
from toolkit.names import M3_METADATA_CLASHES as CLASHES

# A created model that GitLab has since given versions or metadata of its own is kept
# (and stays in the ledger): deleting it would delete that work too.
UNDO_BATCH = f"""
SELECT l.model_id, l.experiment_id FROM {CREATED} l
WHERE l.model_id > :lo AND l.model_id <= :hi
  AND NOT EXISTS (SELECT 1 FROM ml_model_versions v WHERE v.model_id = l.model_id)
  AND NOT EXISTS (SELECT 1 FROM ml_model_metadata mm WHERE mm.model_id = l.model_id
                  AND mm.id NOT IN (SELECT model_metadata_id FROM {COPIED}))"""
UNLINK_CANDIDATES = "UPDATE ml_candidates SET model_id = NULL WHERE model_id = ANY(:models)"
UNLINK_EXPERIMENTS = "UPDATE ml_experiments SET model_id = NULL WHERE model_id = ANY(:models)"
DELETE_MODEL_METADATA = "DELETE FROM ml_model_metadata WHERE model_id = ANY(:models)"
DELETE_MODELS = "DELETE FROM ml_models WHERE id = ANY(:models)"
FORGET_MODELS = f"""
DELETE FROM {COPIED} WHERE model_id = ANY(:models);
DELETE FROM {CREATED} WHERE model_id = ANY(:models)"""

REMOVE_COPIED_METADATA = f"""
WITH batch AS (
    DELETE FROM {COPIED} WHERE model_metadata_id > :lo AND model_metadata_id <= :hi
    RETURNING model_metadata_id
), removed AS (
    DELETE FROM ml_model_metadata WHERE id IN (SELECT model_metadata_id FROM batch) RETURNING id
)
SELECT count(*) FROM removed"""

FORGET_CLASHES = f"""
WITH gone AS (DELETE FROM {CLASHES} WHERE experiment_id > :lo AND experiment_id <= :hi RETURNING 1)
SELECT count(*) FROM gone"""


# rollback --dry-run: what the three undo passes would change, counted read-only, each
# as it will find the tables (the first removes the ledger rows of the models it deletes).
REMOVABLE = f"""SELECT l.model_id FROM {CREATED} l
WHERE NOT EXISTS (SELECT 1 FROM ml_model_versions v WHERE v.model_id = l.model_id)
  AND NOT EXISTS (SELECT 1 FROM ml_model_metadata mm WHERE mm.model_id = l.model_id
                  AND mm.id NOT IN (SELECT model_metadata_id FROM {COPIED}))"""
REMOVE_MODELS_COUNT = f"""
WITH removable AS ({REMOVABLE})
SELECT (SELECT count(*) FROM removable),
       (SELECT count(*) FROM {CREATED}) - (SELECT count(*) FROM removable),
       (SELECT count(*) FROM ml_candidates WHERE model_id IN (SELECT model_id FROM removable)),
       (SELECT count(*) FROM ml_experiments WHERE model_id IN (SELECT model_id FROM removable)),
       (SELECT count(*) FROM ml_model_metadata WHERE model_id IN (SELECT model_id FROM removable))"""
REMOVE_METADATA_COUNT = f"""
SELECT count(*) FROM {COPIED} k JOIN ml_model_metadata mm ON mm.id = k.model_metadata_id
WHERE k.model_id NOT IN ({REMOVABLE})"""


def remove_models_count(conn: Connection) -> dict[str, int]:
    removed, kept, candidates, experiments, metadata = conn.execute(sa.text(REMOVE_MODELS_COUNT)).one()
    return {"created models removed": removed,
            "created models kept (GitLab gave them versions or metadata since)": kept,
            "candidates unlinked (model_id := NULL)": candidates,
            "experiments unlinked (model_id := NULL)": experiments,
            "their metadata rows deleted": metadata}


def remove_metadata_count(conn: Connection) -> dict[str, int]:
    return {"copied metadata rows removed from models kept": conn.execute(
        sa.text(REMOVE_METADATA_COUNT)).scalar_one()}


def forget_clashes_count(conn: Connection) -> dict[str, int]:
    return {"recorded metadata clashes forgotten": conn.execute(
        sa.text(f"SELECT count(*) FROM {CLASHES}")).scalar_one()}


def remove_models_batch(conn: Connection, lo: int, hi: int, run_id: int) -> int:
    rows = conn.execute(sa.text(UNDO_BATCH), {"lo": lo, "hi": hi}).all()
    models = [r.model_id for r in rows]
    if not models:
        return 0
    # Unlink first: both foreign keys to ml_models cascade, and a cascade would delete
    # the experiment and its candidates with the model.
    for statement in (UNLINK_CANDIDATES, UNLINK_EXPERIMENTS, DELETE_MODEL_METADATA, DELETE_MODELS,
                      *FORGET_MODELS.strip().split(";\n")):
        conn.execute(sa.text(statement), {"models": models})
    return len(models)
