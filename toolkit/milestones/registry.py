"""The registry of milestones: the one place that says which milestones exist and in what
order (Alembic reads the order from its revisions' ``down_revision``; here it is the order
of registration). Each milestone's module declares its id (``NAME``) and builds its
:class:`~toolkit.engine.plan.Milestone`; ``toolkit/milestones/__init__.py`` registers them,
one line each. Everything else asks the registry: the plan, ``previous``/``next``, the
short aliases, which later milestone supersedes an earlier one's checks, the CLI's list of
milestones and the contract tests' cases."""

from __future__ import annotations

from collections.abc import Iterator

from toolkit.engine.plan import Milestone, MilestonePlan


class RegistrationError(Exception):
    """A milestone registered twice, or under an id already taken: a programming error,
    raised when the package is imported, before any command runs."""


class Registry:
    """Milestones by id, in the order they were registered."""

    def __init__(self) -> None:
        # A test may put its own milestone in place of one (``monkeypatch.setitem``): the
        # plan is read from here at call time.
        self.milestones: dict[str, Milestone] = {}

    def register(self, milestone: Milestone) -> Milestone:
        """Add ``milestone`` after those registered so far; refuse an id already taken (by
        this milestone or another) and a ``supersedes`` naming a milestone not registered
        before it (what it takes over must come first)."""
        if milestone.name in self.milestones:
            again = "registered twice" if self.milestones[milestone.name] is milestone else \
                f"registered under an id already taken by {self.milestones[milestone.name].title!r}"
            raise RegistrationError(f"milestone {milestone.name!r} {again}: each id is registered once")
        if milestone.supersedes is not None:
            unknown = [m for m in milestone.supersedes.milestones if m not in self.milestones]
            if unknown:
                raise RegistrationError(
                    f"milestone {milestone.name!r} supersedes {', '.join(map(repr, unknown))}: "
                    "what it supersedes must be registered before it")
        self.milestones[milestone.name] = milestone
        return milestone

    def unregister(self, name: str) -> None:
        """Take a milestone out (a test's throwaway milestone, once the test is done)."""
        del self.milestones[name]

    def plan(self) -> MilestonePlan:
        return MilestonePlan(tuple(self.milestones.values()))

    def __iter__(self) -> Iterator[Milestone]:
        return iter(self.milestones.values())

    def __len__(self) -> int:
        return len(self.milestones)


# The registry: filled by ``toolkit/milestones/__init__.py``, one line per milestone.
REGISTRY = Registry()
