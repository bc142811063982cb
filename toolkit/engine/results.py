"""What a step reports: a plan, a post-condition, an anomaly. A leaf module (it imports
nothing of the toolkit's but the row-listing helper), so milestones, the engine, the CLI and
the fingerprint can all speak of these without importing each other. Keyword-only: a plan
has eight fields, and ``StepPlan(name, text, 0, {}, {...}, [], sql)`` said none of them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from toolkit.engine.listing import count_of


@dataclass(kw_only=True)
class Anomaly:
    """A class of rows that needs the operator's attention.

    ``blocking`` anomalies are left untouched by apply; the others are changed and
    reported as warnings.
    """

    kind: str
    title: str
    blocking: bool
    resolution: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return count_of(self.rows)  # every matching row; ``rows`` holds the first of them

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "blocking": self.blocking,
                "count": self.count, "resolution": self.resolution,
                "rows": self.rows if limit is None else self.rows[:limit]}


@dataclass(kw_only=True)
class StepPlan:
    step: str
    description: str
    rows: int
    breakdown: dict[str, int] = field(default_factory=dict)  # sums to ``rows``
    context: dict[str, int] = field(default_factory=dict)  # related counts left unchanged
    anomalies: list[Anomaly] = field(default_factory=list)
    sql: list[str] = field(default_factory=list)
    kind: str = "data"  # or "schema": an Alembic revision, no rows

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "description": self.description, "rows": self.rows,
                "breakdown": self.breakdown, "context": self.context,
                "anomalies": [a.as_dict(limit) for a in self.anomalies], "sql": self.sql}


@dataclass(kw_only=True)
class Check:
    """One post-condition: what was checked, whether it holds, and what to do if not."""

    name: str
    ok: bool
    detail: str
    remedy: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    # The whole next step when this check fails, where "resolve what verify lists, then run
    # the milestone again" would not help (a difference from the baseline: running it again
    # compares with the same baseline and fails the same way).
    next_step: str | None = field(default=None, compare=False)
    # A stable identifier for CI to match on (``name`` is prose, for a person). Derived from
    # the name when not given; a check whose wording changes passes its old id here, so
    # the id never changes (tests/test_cli_operator.py pins those of verify's checks).
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or check_id(self.name)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "ok": self.ok, "detail": self.detail,
                "remedy": self.remedy, "count": count_of(self.rows), "rows": self.rows}


def check_id(name: str) -> str:
    """``every candidate's model_id is its experiment's model`` ->
    ``every-candidates-model_id-is-its-experiments-model``: lower case, the words joined
    by ``-``, identifiers (``model_id``) kept whole."""
    words = re.sub(r"'s\b", "s", name.lower())
    return re.sub(r"[^a-z0-9_]+", "-", words).strip("-")


@dataclass(frozen=True)
class Final:
    """Why a milestone can no longer be undone (milestone 4 once its archive is dropped):
    the runner refuses up front what would need undoing it, and ``status`` says so instead
    of advising a command that cannot succeed."""

    why: str  # "its archive was dropped by run 12 at ...": follows "<milestone> cannot be rolled back: "
    instead: str  # what to do instead (the error's "Next")
    details: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"why": self.why, "instead": self.instead, **self.details}
