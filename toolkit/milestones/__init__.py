"""The blueprint's milestones, in order: the plan the engine is handed. Each module holds
one milestone's steps, nothing else."""

from __future__ import annotations

from toolkit.engine.plan import Milestone, MilestonePlan
from toolkit.milestones.m1_packages import MILESTONE_1
from toolkit.milestones.m2_model_parent import MILESTONE_2
from toolkit.milestones.m3_models_for_experiments import MILESTONE_3
from toolkit.milestones.m4 import MILESTONE_4

MILESTONES: dict[str, Milestone] = {
    m.name: m for m in (MILESTONE_1, MILESTONE_2, MILESTONE_3, MILESTONE_4)
}


def plan() -> MilestonePlan:
    """The plan as it stands (read at call time: a test may put its own milestone in)."""
    return MilestonePlan(tuple(MILESTONES.values()))


def get(name: str) -> Milestone:
    return plan().get(name)


def previous(milestone: Milestone) -> Milestone | None:
    return plan().previous(milestone)


def later(milestone: Milestone) -> list[Milestone]:
    return plan().later(milestone)
