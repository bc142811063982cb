"""The realistic profile of the sandbox's data: what a GitLab instance that has used
experiment tracking for a while holds.

Groups nested up to three levels, projects, users with every access level, experiments
(some the default experiment of a model), candidates with packages of each legacy naming,
model versions, and packages of other kinds the toolkit must never touch. Every choice is
drawn from the builder's seeded ``random.Random``, in a fixed order, so a scale and seed
give the same rows id for id. The adversarial profile
(:mod:`toolkit.sandbox.adversarial`) adds its cases on top of these :class:`Entities`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from toolkit.sandbox.rows import BASE_TIME, GENERIC, ML_MODEL, Builder, Experiment
from toolkit.sandbox.scales import Scale
from toolkit.schema.gitlab import CANDIDATE_STATUSES, PACKAGE_STATUSES, PACKAGE_TYPES

TOPICS = ("churn", "fraud", "ranking", "forecast", "vision", "speech", "recsys", "nlp", "anomaly",
          "pricing", "ocr", "segmentation")
VARIANTS = ("baseline", "tuned", "v2", "large", "distilled", "xgb", "resnet", "bert", "lstm", "prophet")
ANIMALS = ("otter", "lynx", "heron", "yak", "gecko", "ibis", "koala", "marten", "orca", "tapir")
# what log_model leaves in a model version's package (artifact_path '', GitLab's docs)
MODEL_FILES = ("MLmodel", "model.pkl", "requirements.txt")
# project_authorizations.access_level: guest, reporter, developer, maintainer (Gitlab::Access)
ACCESS_LEVELS = (10, 20, 30, 40)
# package status weights: mostly default, each of the others present
STATUS_WEIGHTS = ((0, 88), (1, 3), (2, 2), (3, 2), (4, 3), (5, 2))


@dataclass
class Entities:
    """What the adversarial profile builds on: ids of the realistic rows."""

    users: list[int]
    projects: list[int]
    experiments: list[Experiment]
    created_at: datetime


def _weighted_status(rng: random.Random) -> int:
    statuses, weights = zip(*STATUS_WEIGHTS, strict=True)
    return rng.choices(statuses, weights)[0]


def build_realistic(b: Builder, scale: Scale) -> Entities:
    """The realistic profile's rows: users, groups and projects, experiments (some the
    default experiment of a model), candidates (some with a package), model versions, and
    packages of other kinds. Creation times are spread over ~18 months in order of id, like
    a real table."""
    users = [b.user(f"user{i}") for i in range(1, max(5, scale.projects // 2) + 1)]
    projects = _projects(b, scale)
    clock = _Clock(scale.experiments + scale.candidates)
    experiments, models = _experiments(b, scale, users, projects, clock)
    _candidates(b, scale, users, experiments, clock)
    end = clock.at(clock.total)
    _model_versions(b, models, end)
    _other_packages(b, scale, users, projects, end)
    _authorize_users(b, users, projects)
    return Entities(users, projects, experiments, end)


@dataclass(frozen=True)
class _Clock:
    """Creation times: the ``position``-th of ``total`` rows, ~18 months after BASE_TIME."""

    total: int
    span_minutes: int = 18 * 30 * 24 * 60

    def at(self, position: int) -> datetime:
        return BASE_TIME + timedelta(minutes=self.span_minutes * position / self.total)


def _projects(b: Builder, scale: Scale) -> list[int]:
    """Groups group0..group6, and under group1 a subgroup with a subgroup of its own (mixed
    case: GitLab finds a full path case-insensitively); project i lives in group{i % 7},
    or for group1 in one of the nested subgroups, so projects have one- to three-level paths."""
    groups = [b.namespace(f"group{g}") for g in range(7)]
    team = b.namespace("Team-ML", groups[1])
    vision = b.namespace("vision", team)

    def home(i: int) -> tuple[int, str]:
        if i % 7 != 1:
            return groups[i % 7]
        return vision if i % 14 == 1 else team

    return [b.project(f"project-{i}", home(i)) for i in range(1, scale.projects + 1)]


def _experiments(b: Builder, scale: Scale, users: list[int], projects: list[int],
                 clock: _Clock) -> tuple[list[Experiment], list[tuple[int, Experiment]]]:
    """The experiments, every ``1 / model_fraction``-th the default experiment of a model
    (``[model]<name>``), some with tags; and the models, each with its experiment."""
    rng = b.rng
    model_every = max(1, round(1 / scale.model_fraction))
    experiments: list[Experiment] = []
    models: list[tuple[int, Experiment]] = []
    for i in range(scale.experiments):
        project_id = projects[i % len(projects)] if i < len(projects) else rng.choice(projects)
        created = clock.at(i)
        user_id = rng.choice(users)
        topic, variant = rng.choice(TOPICS), rng.choice(VARIANTS)
        if i % model_every == 0:
            model_name = f"{topic}-{variant}-{i}"
            model_id = b.model(project_id, model_name, created, user_id,
                               description=f"{topic} model" if i % 3 else None)
            exp = b.experiment(project_id, f"[model]{model_name}", created, user_id,
                               model_id=model_id, model_name=model_name)
            models.append((model_id, exp))
            for key in ("task", "framework")[: i % 3]:
                b.model_metadata(model_id, project_id, key, f"{topic}/{key}", created)
        else:
            exp = b.experiment(project_id, f"{topic.title()} {variant} {i}", created, user_id)
        if i % 3 == 0:
            b.experiment_metadata(exp, "team", f"team-{i % 11}")
            if i % 6 == 0:
                b.experiment_metadata(exp, "dataset", f"s3://data/{topic}/{i}.parquet")
        experiments.append(exp)
    return experiments, models


def _candidates(b: Builder, scale: Scale, users: list[int], experiments: list[Experiment],
                clock: _Clock) -> None:
    """The candidates, a share of them with a package of each legacy naming (the newest
    fifth already ``ml_model`` ones)."""
    rng = b.rng
    package_share = scale.candidate_packages / scale.candidates
    ml_model_from = int(scale.candidates * 0.8)  # the newest fifth already gets ml_model packages
    status_ids = list(CANDIDATE_STATUSES.values())
    for j in range(scale.candidates):
        exp = experiments[rng.randrange(len(experiments))]
        created = clock.at(scale.experiments + j)
        user_id = rng.choice(users)
        package_id = None
        if rng.random() < package_share:
            cand_id, cand_iid = b.next_candidate_id(), b.peek_candidate_iid(exp.project_id)
            status = _weighted_status(rng)
            if j >= ml_model_from:
                name, version, ptype = exp.package_name, f"candidate_{cand_iid}", ML_MODEL
            elif rng.random() < 0.1:
                name, version, ptype = f"ml_candidate_{cand_id}", "-", GENERIC
            else:
                name, version, ptype = f"ml_experiment_{exp.iid}", str(cand_iid), GENERIC
            package_id = b.package(exp.project_id, name, version, ptype, created, status=status,
                                   creator_id=user_id, files=1 + j % 3)
        animal = "-".join(rng.choice(ANIMALS) for _ in range(3))
        b.candidate(exp, created, user_id=user_id, status=rng.choice(status_ids),
                    name=f"{animal}-{rng.randrange(10_000):04d}" if j % 17 else None,
                    package_id=package_id, ci_build_id=j if j % 5 == 0 else None)


def _model_versions(b: Builder, models: list[tuple[int, Experiment]], end: datetime) -> None:
    """Half the models get one or two versions, each with its package, a tag and a candidate."""
    for model_id, exp in models[: max(1, len(models) // 2)]:
        for major in range(1, 1 + 1 + exp.id % 2):
            version = f"{major}.0.0"
            package_id = b.package(exp.project_id, exp.model_name or "", version, ML_MODEL, end,
                                   names=MODEL_FILES)
            version_id = b.model_version(model_id, exp.project_id, version, package_id, end)
            b.model_version_metadata(version_id, exp.project_id, "stage", "production", end)
            b.candidate(exp, end, user_id=None, status=CANDIDATE_STATUSES["finished"],
                        name=None, model_version_id=version_id)


def _other_packages(b: Builder, scale: Scale, users: list[int], projects: list[int], end: datetime) -> None:
    """Packages the toolkit must never touch: other types, and generic ones no candidate uses."""
    for k in range(max(4, scale.candidate_packages // 5)):
        project_id = projects[k % len(projects)]
        kind = ("npm", "maven", "pypi", "generic", "helm")[k % 5]
        name = {"npm": f"@group/lib-{k}", "generic": f"release-assets-{k}"}.get(kind, f"lib-{k}")
        b.package(project_id, name, f"1.{k}.0", PACKAGE_TYPES[kind], end,
                  status=PACKAGE_STATUSES["default"], creator_id=users[0], files=1)


def _authorize_users(b: Builder, users: list[int], projects: list[int]) -> None:
    """Every project has a guest, a reporter, a developer and a maintainer, and (with five
    users or more) users without access; no random draw, so the ML rows stay as they were."""
    for i, project_id in enumerate(projects):
        for k, level in enumerate(ACCESS_LEVELS):
            if k < len(users):
                b.authorize(users[(i + k) % len(users)], project_id, level)
