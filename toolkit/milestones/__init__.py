"""The blueprint's milestones, in order. Each module holds one milestone's steps, nothing else."""

from __future__ import annotations

from toolkit.errors import UsageProblem
from toolkit.milestones.base import Milestone
from toolkit.milestones.m1_packages import MILESTONE_1
from toolkit.milestones.m2_model_parent import MILESTONE_2
from toolkit.milestones.m3_models_for_experiments import MILESTONE_3
from toolkit.milestones.m4_cleanup import MILESTONE_4

MILESTONES: dict[str, Milestone] = {
    m.name: m for m in (MILESTONE_1, MILESTONE_2, MILESTONE_3, MILESTONE_4)
}


def get(name: str) -> Milestone:
    key = name if name.startswith("milestone-") else f"milestone-{name}"
    try:
        return MILESTONES[key]
    except KeyError:
        known = ", ".join(MILESTONES)
        raise UsageProblem(f"Unknown milestone {name!r}", f"use one of: {known}") from None


def previous(milestone: Milestone) -> Milestone | None:
    return next((m for m in MILESTONES.values() if m.number == milestone.number - 1), None)


def later(milestone: Milestone) -> list[Milestone]:
    return [m for m in MILESTONES.values() if m.number > milestone.number]
