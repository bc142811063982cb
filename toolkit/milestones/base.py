"""What the milestones share: the one rule by which a later milestone supersedes the checks
of earlier ones, and the transition-trigger step. (What a milestone *is* lives in
:mod:`toolkit.engine.plan`; which milestone supersedes which is its ``supersedes``.)"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from toolkit.engine.catalog_checks import trigger_in_place
from toolkit.engine.ddl import SchemaStep
from toolkit.engine.plan import Supersedes
from toolkit.engine.results import Check, StepPlan
from toolkit.engine.step import Step
from toolkit.milestones.registry import REGISTRY


def _superseded_answer(step: Supersedable, method: str, why: str) -> Any:
    if method == "plan":
        return StepPlan(step=step.name, description=step.description, rows=0, context={why: 0},
                        sql=step.forward_sql())
    if method == "remaining":
        return 0
    return [Check(name=name, ok=True, detail=why) for name in step.superseded_checks]


def _guarded(method: str, answer: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(answer)
    def guarded(step: Supersedable, conn: Connection) -> Any:
        if (by := step.superseded(conn)) is not None:
            return _superseded_answer(step, method, by.why)
        return answer(step, conn)
    return guarded


class Supersedable(Step):
    """A step whose checks read what a later milestone removes (milestone 4 drops the
    experiments milestones 2 and 3 link): once a milestone that ``supersedes`` its own has
    started, it plans nothing, has nothing left, and its checks (``superseded_checks``)
    hold, answered by the later milestone's archive and row-for-row check.

    The rule is written once, here: the ``plan``, ``remaining`` and ``verify`` a subclass
    defines are wrapped when the class is made, so no step repeats the test."""

    milestone: str = ""  # the id of the milestone the step belongs to
    superseded_checks: tuple[str, ...] = ()  # the names its verify answers with once superseded

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in ("plan", "remaining", "verify"):
            if method in cls.__dict__:
                setattr(cls, method, _guarded(method, cls.__dict__[method]))

    def superseded(self, conn: Connection) -> Supersedes | None:
        return REGISTRY.plan().superseded(conn, self.milestone)


class TransitionTriggerStep(Supersedable, SchemaStep):
    """A schema step adding a transition trigger, which a later milestone removes on purpose."""

    trigger: str = ""
    table: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.superseded_checks = (f"{cls.trigger} is in place",)  # its one check, by its trigger

    def verify(self, conn: Connection) -> list[Check]:
        return [trigger_in_place(conn, self.table, self.trigger, self.milestone)]
