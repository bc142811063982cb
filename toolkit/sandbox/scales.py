"""Data-set sizes the sandbox can be seeded at (DESIGN.md §6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    name: str
    projects: int
    experiments: int
    candidates: int
    candidate_packages: int
    metrics: int
    model_fraction: float = 0.1  # share of experiments that are a model's default experiment

    @property
    def metrics_per_candidate(self) -> float:
        return self.metrics / self.candidates


SCALES: dict[str, Scale] = {
    s.name: s
    for s in (
        Scale("small", projects=4, experiments=24, candidates=240, candidate_packages=40, metrics=2_400),
        # The size the blueprint gives for gitlab.com (Feb 2024).
        Scale("gitlab-com", projects=500, experiments=4_000, candidates=38_000,
              candidate_packages=4_000, metrics=400_000),
        Scale("x25", projects=12_500, experiments=100_000, candidates=1_000_000,
              candidate_packages=100_000, metrics=10_000_000),
    )
}

PROFILES = ("realistic", "adversarial")
