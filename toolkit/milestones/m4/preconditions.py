"""What must hold before milestone 4 drops anything: milestones 1 and 2 verify too, every
candidate has a model, and every experiment has its model and its tags (what the drop
leaves of it)."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine import state
from toolkit.engine.listing import count_of, listed
from toolkit.engine.results import STARTED, Check
from toolkit.milestones.m1_packages import MILESTONE_1
from toolkit.milestones.m2_model_parent import MILESTONE_2, BackfillModelId
from toolkit.milestones.m3_models_for_experiments import NAME as M3
from toolkit.milestones.m4 import NAME
from toolkit.names import M3_METADATA_CLASHES as CLASHES
from toolkit.words import counted

MILESTONES_BEFORE = (MILESTONE_1, MILESTONE_2)


def preconditions(conn: Connection) -> list[Check]:
    """Milestones 1 and 2 verify too; no candidate without a model; every experiment has its
    model and its tags."""
    if state.milestone_state(conn, NAME)["state"] in STARTED:
        return []  # a re-run: what was checked when it started still holds, the archive syncs the rest
    checks = []
    for milestone in MILESTONES_BEFORE:
        name = milestone.name
        # Milestone 2's backfill check is milestone 3's last check too, which the gate has
        # just run (every candidate's model_id is its experiment's model): not twice.
        steps = [s for s in milestone.steps if not isinstance(s, BackfillModelId)]
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
                detail=f"{counted(count_of(orphans), 'candidate')} without one" if orphans else "all do",
                remedy=f"run `toolkit migrate {M3}` again" if orphans else None,
                rows=orphans,
            )
        )
    if catalog.relation_exists(conn, "ml_experiments"):
        checks.append(every_experiment_has_its_model_and_tags(conn))
    return checks


def every_experiment_has_its_model_and_tags(conn: Connection) -> Check:
    """After the drop the model is all that is left of an experiment: every experiment must
    have its model, and every tag of it must be on that model with the same value (or be a
    clash milestone 3 recorded, with that value: the model's value is kept, the
    experiment's archived). Experiments MLflow clients created through ``toolkit mlflow
    serve`` after milestone 3 were made with their models and tags
    (:mod:`toolkit.mlflow_api.stages`) and pass; one made by hand without a model blocks."""
    clashes = (f"SELECT 1 FROM {CLASHES} k WHERE k.experiment_id = e.id AND k.name = em.name "
               "AND k.experiment_value = em.value" if catalog.relation_exists(conn, CLASHES)
               else "SELECT 1 WHERE false")  # a database the toolkit never touched: no clash yet
    odd = listed(conn, f"""
        SELECT e.id AS experiment_id, NULL::text AS tag, 'has no model' AS problem
        FROM ml_experiments e WHERE e.model_id IS NULL
        UNION ALL
        SELECT e.id, em.name, CASE WHEN mm.id IS NULL THEN 'tag missing on its model'
                                   ELSE 'tag differs on its model' END
        FROM ml_experiment_metadata em JOIN ml_experiments e ON e.id = em.experiment_id
        LEFT JOIN ml_model_metadata mm ON mm.model_id = e.model_id AND mm.name = em.name
        WHERE e.model_id IS NOT NULL AND mm.value IS DISTINCT FROM em.value
          AND NOT EXISTS ({clashes})
        ORDER BY 1, 2""")
    return Check(
        name="precondition: every experiment has its model and its tags",
        ok=not odd,
        detail=f"{count_of(odd)} differ: " + ", ".join(_said(r) for r in odd[:10]) if odd else "all do",
        remedy=f"run `toolkit migrate {M3}` again (it gives experiments their models and copies "
        "their missing tags); a tag whose value differs on the model: set one to the other's value "
        "in GitLab, then retry" if odd else None,
        rows=odd,
    )


def _said(row: dict) -> str:
    tag = f" tag {row['tag']!r}" if row["tag"] else ""
    return f"experiment {row['experiment_id']}{tag} {row['problem']}"
