"""The blueprint's milestones, in order: the plan the engine is handed. Each module holds
one milestone's steps and declares its id; the lines below register them, and their order
is the milestones' order (:mod:`toolkit.milestones.registry`)."""

from __future__ import annotations

from toolkit.engine.plan import Milestone, MilestonePlan
from toolkit.milestones.m1_packages import MILESTONE_1
from toolkit.milestones.m2_model_parent import MILESTONE_2
from toolkit.milestones.m3_models_for_experiments import MILESTONE_3
from toolkit.milestones.m4 import MILESTONE_4
from toolkit.milestones.registry import REGISTRY

REGISTRY.register(MILESTONE_1)
REGISTRY.register(MILESTONE_2)
REGISTRY.register(MILESTONE_3)
REGISTRY.register(MILESTONE_4)

# The registered milestones by id, in order (the registry's own mapping).
MILESTONES: dict[str, Milestone] = REGISTRY.milestones


def plan() -> MilestonePlan:
    """The plan as it stands (read at call time: a test may put its own milestone in)."""
    return REGISTRY.plan()


def get(name: str) -> Milestone:
    return plan().get(name)


def previous(milestone: Milestone) -> Milestone | None:
    return plan().previous(milestone)


def later(milestone: Milestone) -> list[Milestone]:
    return plan().later(milestone)
