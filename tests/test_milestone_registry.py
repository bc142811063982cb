"""The registry of milestones (toolkit/milestones/registry.py): ids registered once, order
from registration, previous/next and the short aliases from that order, ``supersedes`` as
data; and a fifth milestone added the way docs/adding-a-milestone.md says, in-process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import toolkit, toolkit_json

from toolkit.engine.plan import Milestone, Supersedes
from toolkit.engine.results import Check, StepPlan
from toolkit.engine.step import Step
from toolkit.milestones import REGISTRY
from toolkit.milestones.m1_packages import MILESTONE_1
from toolkit.milestones.m2_model_parent import MILESTONE_2
from toolkit.milestones.m3_models_for_experiments import MILESTONE_3
from toolkit.milestones.m4 import MILESTONE_4
from toolkit.milestones.registry import RegistrationError, Registry

FIFTH = "milestone-5"


class NothingToDo(Step):
    """A throwaway step: plans nothing, verifies one check that holds."""

    name = "nothing-to-do"
    description = "a test-only step that changes nothing"

    def plan(self, conn) -> StepPlan:
        return StepPlan(step=self.name, description=self.description, rows=0)

    def verify(self, conn) -> list[Check]:
        return [Check(name="nothing to do", ok=True, detail="as planned")]


def _fifth(**kwargs) -> Milestone:
    return Milestone(name=FIFTH, title="A test-only fifth milestone", steps=(NothingToDo(),),
                     reads=("ml_candidates",), **kwargs)


@pytest.fixture
def fifth() -> Iterator[Milestone]:
    """The one registration a fifth milestone needs, taken back after the test."""
    milestone = REGISTRY.register(_fifth())
    try:
        yield milestone
    finally:
        REGISTRY.unregister(FIFTH)


def test_the_order_is_the_order_of_registration():
    assert list(REGISTRY) == [MILESTONE_1, MILESTONE_2, MILESTONE_3, MILESTONE_4]
    plan = REGISTRY.plan()
    assert plan.previous(MILESTONE_1) is None and plan.next(MILESTONE_4) is None
    assert plan.previous(MILESTONE_3) is MILESTONE_2 and plan.next(MILESTONE_3) is MILESTONE_4
    assert plan.later(MILESTONE_2) == [MILESTONE_3, MILESTONE_4]
    assert plan.get("3") is MILESTONE_3 and plan.get("milestone-3") is MILESTONE_3


def test_a_registry_orders_by_registration_not_by_name():
    registry = Registry()
    for milestone in (MILESTONE_2, MILESTONE_1):
        registry.register(milestone)
    plan = registry.plan()
    assert plan.names == ["milestone-2", "milestone-1"]
    assert plan.previous(MILESTONE_1) is MILESTONE_2 and plan.get("1") is MILESTONE_2


def test_a_second_registration_is_refused():
    registry = Registry()
    registry.register(MILESTONE_1)
    with pytest.raises(RegistrationError, match="milestone 'milestone-1' registered twice"):
        registry.register(MILESTONE_1)
    assert registry.plan().names == ["milestone-1"]


def test_a_duplicate_id_is_refused():
    registry = Registry()
    registry.register(MILESTONE_1)
    impostor = Milestone(name="milestone-1", title="another first", steps=(), reads=())
    with pytest.raises(RegistrationError, match="'milestone-1' registered under an id already taken by "
                                                "'Candidate packages become ml_model packages'"):
        registry.register(impostor)
    assert registry.plan().get("milestone-1") is MILESTONE_1


def test_supersedes_must_name_milestones_registered_before():
    registry = Registry()
    registry.register(MILESTONE_1)
    with pytest.raises(RegistrationError, match="'milestone-4' supersedes 'milestone-2', 'milestone-3': what it "
                                                "supersedes must be registered before it"):
        registry.register(MILESTONE_4)


def test_milestone_4_supersedes_milestones_2_and_3():
    plan = REGISTRY.plan()
    assert plan.superseding("milestone-2") == plan.superseding("milestone-3") == [MILESTONE_4]
    assert plan.superseding("milestone-1") == []


def test_a_superseding_milestone_answers_the_superseded_checks(realistic_db, fifth):
    """The rule is generic: a later milestone that supersedes milestone 2 (its removals
    found done) makes milestone 2's backfill plan nothing and its check hold, with its why."""
    REGISTRY.unregister(FIFTH)
    REGISTRY.register(_fifth(supersedes=Supersedes(milestones=("milestone-2",), why="taken over by 5",
                                                   gone_sql="SELECT true")))
    with realistic_db.engine.connect() as conn:
        backfill = next(s for s in MILESTONE_2.steps if s.name == "backfill-model-id")
        planned = backfill.plan(conn)
        assert (planned.rows, planned.context) == (0, {"taken over by 5": 0})
        assert backfill.remaining(conn) == 0
        checks = [c for c in MILESTONE_2.verify(conn) if c.name == "every candidate's model_id is its experiment's model"]
        assert [(c.ok, c.detail) for c in checks] == [(True, "taken over by 5")]
        assert MILESTONE_1.plan(conn)[0].rows > 0  # milestone 1 is not superseded
        assert conn.execute(sa.text("SELECT to_regclass('ml_experiments') IS NOT NULL")).scalar_one()


def test_a_fifth_milestone_needs_one_registration(realistic_db, fifth):
    """Registered in-process as docs/adding-a-milestone.md says: plan, status and the
    help list it after milestone 4, and its alias is its place."""
    code, planned = toolkit_json(realistic_db, "plan")
    assert code == 0, planned
    assert [m["milestone"] for m in planned["result"]["milestones"]] == [
        "milestone-1", "milestone-2", "milestone-3", "milestone-4", FIFTH]
    code, status = toolkit_json(realistic_db, "status")
    assert code == 0, status
    assert [m["milestone"] for m in status["result"]["milestones"]][-1] == FIFTH
    code, alone = toolkit_json(realistic_db, "plan", "5")
    assert code == 0 and [m["milestone"] for m in alone["result"]["milestones"]] == [FIFTH]
    assert "milestone-5, 5  A test-only fifth milestone" in toolkit(realistic_db, "plan", "--help").output
