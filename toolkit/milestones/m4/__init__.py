"""Milestone 4: archive, then drop ``ml_experiments``, ``ml_experiment_metadata`` and
``ml_candidates.experiment_id``; a rollback rebuilds them exactly and restores every row.

Its steps, in order (each safe to run again after a crash, each with its own plan, verify,
remaining and backward):

1. :class:`~.steps.CaptureDdl`: record, from the catalog, the DDL of everything that will
   be dropped (:mod:`.capture`);
2. :class:`~.steps.ArchiveRows`: archive tables ``LIKE`` the live ones, triggers that keep
   them in sync while GitLab writes, then the rows in keyset batches (:mod:`.archive`);
3. :class:`~.steps.CheckArchive`: source and archive compared row for row (count and
   content hash); any difference stops the run before anything is dropped;
4. :class:`~.steps.ModelIdNotNull`: ``ml_candidates.model_id`` NOT NULL without a long
   lock, and the run uniqueness ``(model_id, eid)`` built CONCURRENTLY;
5. :class:`~.drop.DropLegacy`: the drops, each under lock_timeout with retries; backward,
   the exact rebuild.
"""

from __future__ import annotations

# This milestone's id, declared before its parts are imported: they name it in their messages.
NAME = "milestone-4"

from toolkit.engine.plan import Milestone, Supersedes  # noqa: E402
from toolkit.milestones.m2_model_parent import NAME as M2  # noqa: E402
from toolkit.milestones.m3_models_for_experiments import NAME as M3  # noqa: E402
from toolkit.milestones.m4.drop import DropLegacy  # noqa: E402
from toolkit.milestones.m4.final import archive_dropped  # noqa: E402
from toolkit.milestones.m4.preconditions import preconditions  # noqa: E402
from toolkit.milestones.m4.steps import ArchiveRows, CaptureDdl, CheckArchive, ModelIdNotNull  # noqa: E402
from toolkit.names import M4_DROPPED_COLUMN, M4_DROPPED_TABLES  # noqa: E402

SUPERSEDED = "superseded: milestone 4 archived the experiments (toolkit.m4_archive_*)"

MILESTONE_4 = Milestone(
    name=NAME,
    title="Cleanup: archive, then drop ml_experiments, ml_experiment_metadata, candidates' experiment_id",
    steps=(CaptureDdl(), ArchiveRows(), CheckArchive(), ModelIdNotNull(), DropLegacy()),
    reads=("ml_candidates", "ml_models"),
    updates=("ml_candidates",),
    drops=M4_DROPPED_TABLES,
    drops_columns=(".".join(M4_DROPPED_COLUMN),),
    preconditions=preconditions,
    confirm=True,
    final=archive_dropped,  # once `toolkit archive drop` has run: no rollback can rebuild
    hold_point="drop-transition-triggers",  # after the row-for-row check, before any drop
    # The checks of milestones 2 and 3 that join experiments are answered, once it has
    # started (or the experiments are found gone), by its archive and row-for-row check.
    supersedes=Supersedes(milestones=(M2, M3), why=SUPERSEDED,
                          gone_sql="SELECT to_regclass('ml_experiments') IS NULL"),
)
