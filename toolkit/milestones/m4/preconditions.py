"""What must hold before milestone 4 drops anything: milestones 1 and 2 verify too, every
candidate has a model, and nothing was written to experiments since milestone 3 finished."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine.listing import count_of, listed
from toolkit.engine.results import Check
from toolkit.milestones.base import cleanup_started
from toolkit.milestones.m1_packages import MILESTONE_1
from toolkit.milestones.m2_model_parent import MILESTONE_2, BackfillModelId

MILESTONES_BEFORE = {m.name: m for m in (MILESTONE_1, MILESTONE_2)}


def preconditions(conn: Connection) -> list[Check]:
    """Milestones 1 and 2 verify too; no candidate without a model; nothing written since M3."""
    if cleanup_started(conn):
        return []  # a re-run: what was checked when it started still holds, the archive syncs the rest
    checks = []
    for name in ("milestone-1", "milestone-2"):
        # Milestone 2's backfill check is milestone 3's last check too, which the gate has
        # just run (every candidate's model_id is its experiment's model): not twice.
        steps = [s for s in MILESTONES_BEFORE[name].steps if not isinstance(s, BackfillModelId)]
        failed = [c for step in steps for c in step.verify(conn) if not c.ok]
        checks.append(
            Check(
                name=f"precondition: {name} verifies",
                ok=not failed,
                detail=failed[0].detail if failed else "it does",
                remedy=f"run `toolkit verify {name}` and fix what it lists" if failed else None,
            )
        )
    if catalog.column_exists(conn, "ml_candidates", "model_id"):
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
        if catalog.relation_exists(conn, "toolkit.milestones")
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
