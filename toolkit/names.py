"""Every object a milestone creates, named once.

The Alembic revisions that create them, the milestones that check and drop them, milestone
4's DDL capture and the fingerprint all import their names from here, so a rename is one
edit and a check can never look for an object under a name nobody creates.
"""

from __future__ import annotations

OWN_SCHEMA = "toolkit"

# Milestone 1: the ledger of converted packages (what its rollback restores).
M1_LEDGER = f"{OWN_SCHEMA}.m1_converted_packages"

# Milestone 2: ml_candidates.model_id, its index, foreign key and transition trigger.
M2_COLUMN = ("ml_candidates", "model_id")
M2_INDEX = "index_ml_candidates_on_model_id"
M2_FOREIGN_KEY = "fk_ml_candidates_model_id"
M2_TRIGGER = "trigger_ml_candidates_model_id_transition"

# Milestone 3: ml_models.display_name, its length check and transition trigger; the ledgers.
M3_COLUMN = ("ml_models", "display_name")
M3_CHECK = "check_ml_models_display_name_length"
M3_TRIGGER = "trigger_ml_models_display_name_transition"
M3_CREATED_MODELS = f"{OWN_SCHEMA}.m3_created_models"
M3_COPIED_METADATA = f"{OWN_SCHEMA}.m3_copied_metadata"
M3_METADATA_CLASHES = f"{OWN_SCHEMA}.m3_metadata_clashes"

# The transition triggers milestones 2 and 3 add and milestone 4 removes: (table, trigger).
TRANSITION_TRIGGERS = (("ml_candidates", M2_TRIGGER), ("ml_models", M3_TRIGGER))

# Milestone 4: what it drops, and the archive it keeps so a rollback can rebuild them.
M4_DROPPED_TABLES = ("ml_experiments", "ml_experiment_metadata")
M4_DROPPED_COLUMN = ("ml_candidates", "experiment_id")
M4_ARCHIVED_DDL = f"{OWN_SCHEMA}.m4_archived_ddl"
M4_ARCHIVE_EXPERIMENTS = f"{OWN_SCHEMA}.m4_archive_ml_experiments"
M4_ARCHIVE_METADATA = f"{OWN_SCHEMA}.m4_archive_ml_experiment_metadata"
M4_ARCHIVE_CANDIDATES = f"{OWN_SCHEMA}.m4_archive_candidate_experiments"
M4_ARCHIVES = {  # dropped table -> its archive (same columns, LIKE the live table)
    "ml_experiments": M4_ARCHIVE_EXPERIMENTS,
    "ml_experiment_metadata": M4_ARCHIVE_METADATA,
}
M4_SYNC_TRIGGER = "toolkit_m4_archive_sync"  # keeps the archive current while GitLab writes
M4_MODEL_ID_CHECK = "check_ml_candidates_model_id_not_null"
M4_EXPERIMENT_ID_CHECK = "check_ml_candidates_experiment_id_not_null"
M4_UNIQUE_INDEX = "index_ml_candidates_on_model_id_and_eid"
# The MLflow experiment id (per-project iid) of every model that stands for an experiment:
# written by milestone 4 in the transaction that drops ml_experiments, kept by
# `toolkit archive drop`, emptied by milestone 4's rollback (the experiments are back).
M4_EXPERIMENT_IDS = f"{OWN_SCHEMA}.mlflow_experiment_ids"
