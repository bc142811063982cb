"""A deterministic generator of GitLab-shaped ML data, fast enough for the x25 scale.

Same scale, profile and seed give the same rows, id for id (tests compare content
hashes). Speed comes from three choices:

* the tables are created bare and finished (indexes, foreign keys, triggers) after the
  load (:mod:`toolkit.sandbox.legacy_schema`);
* entity rows (projects, experiments, models, candidates, packages) are built in Python
  with explicit ids and streamed with COPY in bounded buffers, so memory stays flat;
* the bulk child rows (params, metrics, candidate metadata: 90% of the volume) are
  generated inside PostgreSQL with ``INSERT … SELECT`` over the loaded candidates, their
  values derived from ``hashint8extended(…, seed)`` so they are deterministic too.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.sandbox.legacy_schema import ALL_TABLES, create_tables, finish_schema
from toolkit.sandbox.scales import PROFILES, Scale
from toolkit.schema import gitlab
from toolkit.schema.gitlab import CANDIDATE_STATUSES, PACKAGE_STATUSES, PACKAGE_TYPES

BASE_TIME = datetime(2023, 6, 1, tzinfo=UTC)

COLUMNS: dict[str, tuple[str, ...]] = {
    "namespaces": ("id", "name", "path", "type", "parent_id"),
    "projects": ("id", "name", "path", "namespace_id"),
    "routes": ("id", "source_id", "source_type", "path", "created_at", "updated_at", "name"),
    "users": ("id", "username", "state", "admin"),
    "project_authorizations": ("user_id", "project_id", "access_level", "is_unique"),
    "ml_models": ("id", "created_at", "updated_at", "project_id", "name", "description", "user_id",
                  "cached_markdown_version", "description_html"),
    "ml_experiments": ("id", "created_at", "updated_at", "iid", "project_id", "user_id", "name",
                       "deleted_on", "model_id"),
    "ml_experiment_metadata": ("id", "created_at", "updated_at", "experiment_id", "name", "value",
                               "project_id"),
    "ml_candidates": ("id", "created_at", "updated_at", "experiment_id", "user_id", "start_time",
                      "end_time", "status", "name", "package_id", "eid", "project_id", "internal_id",
                      "ci_build_id", "model_version_id"),
    "ml_candidate_params": ("created_at", "updated_at", "candidate_id", "name", "value", "project_id"),
    "ml_candidate_metrics": ("created_at", "updated_at", "candidate_id", "value", "step", "is_nan",
                             "name", "tracked_at", "project_id"),
    "ml_candidate_metadata": ("created_at", "updated_at", "candidate_id", "name", "value",
                              "project_id"),
    "ml_model_metadata": ("id", "created_at", "updated_at", "model_id", "name", "value", "project_id"),
    "ml_model_versions": ("id", "created_at", "updated_at", "project_id", "model_id", "package_id",
                          "version", "description", "semver_major", "semver_minor", "semver_patch",
                          "semver_prerelease"),
    "ml_model_version_metadata": ("id", "created_at", "updated_at", "project_id", "model_version_id",
                                  "name", "value"),
    "packages_packages": ("id", "project_id", "created_at", "updated_at", "name", "version",
                          "package_type", "creator_id", "status", "last_downloaded_at",
                          "status_message"),
    "packages_package_files": ("id", "package_id", "created_at", "updated_at", "size", "file_name",
                               "file", "file_sha256", "status", "project_id"),
}

GENERIC = PACKAGE_TYPES["generic"]
ML_MODEL = PACKAGE_TYPES["ml_model"]

TOPICS = ("churn", "fraud", "ranking", "forecast", "vision", "speech", "recsys", "nlp", "anomaly",
          "pricing", "ocr", "segmentation")
VARIANTS = ("baseline", "tuned", "v2", "large", "distilled", "xgb", "resnet", "bert", "lstm", "prophet")
ANIMALS = ("otter", "lynx", "heron", "yak", "gecko", "ibis", "koala", "marten", "orca", "tapir")
FILES = ("model.pkl", "metrics.json", "requirements.txt", "conda.yaml", "MLmodel", "weights.bin")
# what log_model leaves in a model version's package (artifact_path '', GitLab's docs)
MODEL_FILES = ("MLmodel", "model.pkl", "requirements.txt")
# project_authorizations.access_level: guest, reporter, developer, maintainer (Gitlab::Access)
ACCESS_LEVELS = (10, 20, 30, 40)
# package status weights: mostly default, each of the others present
STATUS_WEIGHTS = ((0, 88), (1, 3), (2, 2), (3, 2), (4, 3), (5, 2))


class CopySink:
    """Buffers rows per table and writes them with COPY when a buffer fills up."""

    def __init__(self, conn: Connection, flush_rows: int = 25_000):
        self._dbapi = cast(psycopg.Connection, conn.connection.driver_connection)
        self._flush_rows = flush_rows
        self._buffers: dict[str, list[tuple]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, table: str, **values: object) -> None:
        row = tuple(values.get(column) for column in COLUMNS[table])
        buffer = self._buffers[table]
        buffer.append(row)
        self.counts[table] += 1
        if len(buffer) >= self._flush_rows:
            self.flush(table)

    def flush(self, table: str | None = None) -> None:
        for name in [table] if table else list(self._buffers):
            rows = self._buffers.pop(name, [])
            if not rows:
                continue
            columns = ", ".join(COLUMNS[name])
            with self._dbapi.cursor() as cursor, cursor.copy(
                f"COPY {name} ({columns}) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)


@dataclass
class Experiment:
    id: int
    iid: int
    project_id: int
    name: str
    created_at: datetime
    model_id: int | None = None
    model_name: str | None = None

    @property
    def package_name(self) -> str:
        """GitLab's Experiment#package_name: the model's name for a default experiment."""
        return self.model_name if self.model_name else f"ml_experiment_{self.iid}"


@dataclass
class Builder:
    """Adds rows with explicit ids and GitLab's per-project iid sequences."""

    sink: CopySink
    rng: random.Random
    ids: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    experiment_iids: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    candidate_iids: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def _next(self, table: str) -> int:
        self.ids[table] += 1
        return self.ids[table]

    def namespace(self, path: str, parent: tuple[int, str] | None = None) -> tuple[int, str]:
        """A group (a subgroup under ``parent``) and its route; its id and full path."""
        nid = self._next("namespaces")
        full_path = f"{parent[1]}/{path}" if parent else path
        self.sink.add("namespaces", id=nid, name=path, path=path, type="Group",
                      parent_id=parent[0] if parent else None)
        self._route(nid, "Namespace", full_path)
        return nid, full_path

    def project(self, path: str, namespace: tuple[int, str]) -> int:
        pid = self._next("projects")
        full_path = f"{namespace[1]}/{path}"
        self.sink.add("projects", id=pid, name=full_path, path=path, namespace_id=namespace[0])
        self._route(pid, "Project", full_path)
        return pid

    def _route(self, source_id: int, source_type: str, full_path: str) -> None:
        self.sink.add("routes", id=self._next("routes"), source_id=source_id, source_type=source_type,
                      path=full_path, created_at=BASE_TIME, updated_at=BASE_TIME, name=full_path)

    def user(self, username: str, state: str = "active", admin: bool = False) -> int:
        uid = self._next("users")
        self.sink.add("users", id=uid, username=username, state=state, admin=admin)
        return uid

    def authorize(self, user_id: int, project_id: int, access_level: int) -> None:
        """A ``project_authorizations`` row: the user's access to the project (10 guest,
        20 reporter, 30 developer, 40 maintainer, 50 owner), as GitLab derives it from
        memberships."""
        self.sink.add("project_authorizations", user_id=user_id, project_id=project_id,
                      access_level=access_level, is_unique=None)

    def model(self, project_id: int, name: str, created_at: datetime, user_id: int | None,
              description: str | None = None) -> int:
        mid = self._next("ml_models")
        self.sink.add("ml_models", id=mid, created_at=created_at, updated_at=created_at,
                      project_id=project_id, name=name, description=description, user_id=user_id)
        return mid

    def model_metadata(self, model_id: int, project_id: int | None, name: str, value: str,
                       created_at: datetime) -> None:
        self.sink.add("ml_model_metadata", id=self._next("ml_model_metadata"), created_at=created_at,
                      updated_at=created_at, model_id=model_id, name=name, value=value,
                      project_id=project_id)

    def experiment(self, project_id: int, name: str, created_at: datetime, user_id: int | None,
                   model_id: int | None = None, model_name: str | None = None,
                   deleted_on: datetime | None = None) -> Experiment:
        self.experiment_iids[project_id] += 1
        exp = Experiment(self._next("ml_experiments"), self.experiment_iids[project_id], project_id,
                         name, created_at, model_id, model_name)
        self.sink.add("ml_experiments", id=exp.id, created_at=created_at, updated_at=created_at,
                      iid=exp.iid, project_id=project_id, user_id=user_id, name=name,
                      deleted_on=deleted_on, model_id=model_id)
        return exp

    def experiment_metadata(self, exp: Experiment, name: str, value: str) -> None:
        self.sink.add("ml_experiment_metadata", id=self._next("ml_experiment_metadata"),
                      created_at=exp.created_at, updated_at=exp.created_at, experiment_id=exp.id,
                      name=name, value=value, project_id=exp.project_id)

    def package(self, project_id: int, name: str, version: str | None, package_type: int,
                created_at: datetime, *, status: int = 0, creator_id: int | None = None,
                files: int = 1, status_message: str | None = None,
                names: tuple[str, ...] | None = None) -> int:
        """A package and its files (``names``, else ``files`` of FILES); sizes in bytes."""
        pkg_id = self._next("packages_packages")
        self.sink.add("packages_packages", id=pkg_id, project_id=project_id, created_at=created_at,
                      updated_at=created_at, name=name, version=version, package_type=package_type,
                      creator_id=creator_id, status=status, status_message=status_message)
        for n, file_name in enumerate(names or [FILES[(pkg_id + k) % len(FILES)] for k in range(files)]):
            size = (200 + (pkg_id * 7 + n) % 400 if file_name == "MLmodel"
                    else 1024 * (1 + (pkg_id * 7 + n) % 5000))
            self.sink.add("packages_package_files", id=self._next("packages_package_files"),
                          package_id=pkg_id, created_at=created_at, updated_at=created_at,
                          size=size, file_name=file_name,
                          file=file_name, file_sha256=uuid.UUID(int=self.rng.getrandbits(128)).bytes * 2,
                          status=0, project_id=project_id)
        return pkg_id

    def candidate(self, exp: Experiment, created_at: datetime, *, user_id: int | None,
                  status: int, name: str | None, package_id: int | None = None,
                  internal_id: int | str | None = "next", model_version_id: int | None = None,
                  start_time: int | str | None = "auto", end_time: int | str | None = "auto",
                  ci_build_id: int | None = None, project_id: int | None = None) -> tuple[int, int | None]:
        """Returns (id, iid); the iid comes from the project's sequence unless given."""
        cid = self._next("ml_candidates")
        if internal_id == "next":
            self.candidate_iids[exp.project_id] += 1
            internal_id = self.candidate_iids[exp.project_id]
        start_ms = int(created_at.timestamp() * 1000)
        if start_time == "auto":
            start_time = start_ms
        if end_time == "auto":
            running = status == CANDIDATE_STATUSES["running"]
            end_time = None if running else start_ms + 60_000 * (1 + cid % 240)
        self.sink.add("ml_candidates", id=cid, created_at=created_at, updated_at=created_at,
                      experiment_id=exp.id, user_id=user_id, start_time=start_time,
                      end_time=end_time, status=status, name=name, package_id=package_id,
                      eid=uuid.UUID(int=self.rng.getrandbits(128), version=4),
                      project_id=project_id or exp.project_id, internal_id=internal_id,
                      ci_build_id=ci_build_id, model_version_id=model_version_id)
        return cid, internal_id  # type: ignore[return-value]

    def next_candidate_id(self) -> int:
        return self.ids["ml_candidates"] + 1

    def peek_candidate_iid(self, project_id: int) -> int:
        return self.candidate_iids[project_id] + 1

    def model_version(self, model_id: int, project_id: int, version: str, package_id: int | None,
                      created_at: datetime) -> int:
        vid = self._next("ml_model_versions")
        major, minor, patch = (int(p) for p in version.split("-")[0].split(".")[:3])
        self.sink.add("ml_model_versions", id=vid, created_at=created_at, updated_at=created_at,
                      project_id=project_id, model_id=model_id, package_id=package_id,
                      version=version, semver_major=major, semver_minor=minor, semver_patch=patch,
                      semver_prerelease=version.split("-", 1)[1] if "-" in version else None)
        return vid

    def model_version_metadata(self, version_id: int, project_id: int, name: str, value: str,
                               created_at: datetime) -> None:
        self.sink.add("ml_model_version_metadata", id=self._next("ml_model_version_metadata"),
                      created_at=created_at, updated_at=created_at, project_id=project_id,
                      model_version_id=version_id, name=name, value=value)


@dataclass
class SeedReport:
    scale: str
    profile: str
    seed: int
    seconds: float
    phases: dict[str, float]
    counts: dict[str, int]


def seed_database(conn: Connection, scale: Scale, profile: str = "realistic", seed: int = 1,
                  on_phase: Callable[[str], None] | None = None) -> SeedReport:
    """Create GitLab's tables in an empty database and fill them. Commits at the end."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}")
    phases: dict[str, float] = {}
    started = last = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        phases[name] = round(now - last, 3)
        last = now
        if on_phase:
            on_phase(name)

    for setting in ("synchronous_commit = off", "synchronize_seqscans = off",
                    "max_parallel_workers_per_gather = 0", "maintenance_work_mem = '512MB'"):
        conn.execute(sa.text(f"SET {setting}"))
    create_tables(conn)
    phase("create tables")

    sink = CopySink(conn)
    builder = Builder(sink, random.Random(seed))
    entities = _build_realistic(builder, scale)
    if profile == "adversarial":
        from toolkit.sandbox.adversarial import add_adversarial_rows

        add_adversarial_rows(builder, entities)
    sink.flush()
    phase("copy entities")

    _generate_children(conn, scale, seed)
    phase("generate params, metrics, metadata")

    for table in (t for t in ALL_TABLES if "id" in gitlab.metadata.tables[t].c):
        conn.execute(sa.text(
            f"SELECT setval('{table}_id_seq', COALESCE((SELECT max(id) FROM {table}), 0) + 1, false)"
        ))
    finish_schema(conn)
    phase("indexes, foreign keys, triggers")
    conn.commit()
    conn.execute(sa.text("ANALYZE"))
    conn.commit()
    phase("analyze")

    counts = {
        table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
        for table in ALL_TABLES
    }
    return SeedReport(scale.name, profile, seed, round(time.perf_counter() - started, 3), phases, counts)


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


def _build_realistic(b: Builder, scale: Scale) -> Entities:
    rng = b.rng
    users = [b.user(f"user{i}") for i in range(1, max(5, scale.projects // 2) + 1)]
    # Groups group0..group6, and under group1 a subgroup with a subgroup of its own (mixed
    # case: GitLab finds a full path case-insensitively); project i lives in group{i % 7},
    # or for group1 in one of the nested subgroups, so projects have one- to three-level paths.
    groups = [b.namespace(f"group{g}") for g in range(7)]
    team = b.namespace("Team-ML", groups[1])
    vision = b.namespace("vision", team)

    def home(i: int) -> tuple[int, str]:
        if i % 7 != 1:
            return groups[i % 7]
        return vision if i % 14 == 1 else team

    projects = [b.project(f"project-{i}", home(i)) for i in range(1, scale.projects + 1)]
    model_every = max(1, round(1 / scale.model_fraction))
    # Spread creation over ~18 months, in order of id, like a real table.
    span_minutes = 18 * 30 * 24 * 60
    total = scale.experiments + scale.candidates

    def at(position: int) -> datetime:
        return BASE_TIME + timedelta(minutes=span_minutes * position / total)

    experiments: list[Experiment] = []
    models: list[tuple[int, Experiment]] = []
    for i in range(scale.experiments):
        project_id = projects[i % len(projects)] if i < len(projects) else rng.choice(projects)
        created = at(i)
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

    package_share = scale.candidate_packages / scale.candidates
    ml_model_from = int(scale.candidates * 0.8)  # the newest fifth already gets ml_model packages
    status_ids = list(CANDIDATE_STATUSES.values())
    for j in range(scale.candidates):
        exp = experiments[rng.randrange(len(experiments))]
        created = at(scale.experiments + j)
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

    end = at(total)
    for model_id, exp in models[: max(1, len(models) // 2)]:
        for major in range(1, 1 + 1 + exp.id % 2):
            version = f"{major}.0.0"
            package_id = b.package(exp.project_id, exp.model_name or "", version, ML_MODEL, end,
                                   names=MODEL_FILES)
            version_id = b.model_version(model_id, exp.project_id, version, package_id, end)
            b.model_version_metadata(version_id, exp.project_id, "stage", "production", end)
            b.candidate(exp, end, user_id=None, status=CANDIDATE_STATUSES["finished"],
                        name=None, model_version_id=version_id)

    # Packages the toolkit must never touch: other types, and generic ones no candidate uses.
    for k in range(max(4, scale.candidate_packages // 5)):
        project_id = projects[k % len(projects)]
        kind = ("npm", "maven", "pypi", "generic", "helm")[k % 5]
        name = {"npm": f"@group/lib-{k}", "generic": f"release-assets-{k}"}.get(kind, f"lib-{k}")
        b.package(project_id, name, f"1.{k}.0", PACKAGE_TYPES[kind], end,
                  status=PACKAGE_STATUSES["default"], creator_id=users[0], files=1)
    _authorize_users(b, users, projects)
    return Entities(users, projects, experiments, end)


def _authorize_users(b: Builder, users: list[int], projects: list[int]) -> None:
    """Every project has a guest, a reporter, a developer and a maintainer, and (with five
    users or more) users without access; no random draw, so the ML rows stay as they were."""
    for i, project_id in enumerate(projects):
        for k, level in enumerate(ACCESS_LEVELS):
            if k < len(users):
                b.authorize(users[(i + k) % len(users)], project_id, level)


def _generate_children(conn: Connection, scale: Scale, seed: int) -> None:
    """Params, metrics and candidate metadata, generated in SQL from the loaded candidates."""
    params = {"seed": seed}
    # h(x) is a deterministic pseudo-random non-negative bigint for an integer x.
    conn.execute(sa.text("""
        INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value, project_id)
        SELECT c.created_at, c.created_at, c.id, p.name,
               CASE p.name
                 WHEN 'learning_rate'
                   THEN (0.0001 * (1 + abs(hashint8extended(c.id * 8 + 1, :seed)) % 100))::text
                 WHEN 'batch_size' THEN (16 << (abs(hashint8extended(c.id * 8 + 2, :seed)) % 5)::int)::text
                 WHEN 'epochs' THEN (1 + abs(hashint8extended(c.id * 8 + 3, :seed)) % 50)::text
                 ELSE (ARRAY['adam', 'sgd', 'rmsprop'])[1 + abs(hashint8extended(c.id * 8 + 4, :seed)) % 3]
               END,
               c.project_id
        FROM ml_candidates c
        CROSS JOIN LATERAL unnest(ARRAY['learning_rate', 'batch_size', 'epochs', 'optimizer'])
             WITH ORDINALITY AS p(name, k)
        WHERE p.k <= 1 + abs(hashint8extended(c.id, :seed)) % 4
    """), params)
    per_candidate = max(1, round(scale.metrics_per_candidate))
    conn.execute(sa.text("""
        INSERT INTO ml_candidate_metrics
            (created_at, updated_at, candidate_id, value, step, is_nan, name, tracked_at, project_id)
        SELECT c.created_at, c.created_at, c.id,
               (abs(hashint8extended(c.id * 1000 + s, :seed)) % 1000000)::float8 / 1000000,
               s / k.names, NULL,
               (ARRAY['loss', 'accuracy', 'f1'])[1 + s % k.names],
               c.start_time + s * 60000, c.project_id
        FROM ml_candidates c
        CROSS JOIN LATERAL (SELECT 1 + abs(hashint8extended(c.id, :seed + 1)) % 3 AS names,
                                   abs(hashint8extended(c.id, :seed + 2)) % (2 * :per + 1) AS n) k
        CROSS JOIN LATERAL generate_series(0, k.n - 1) AS s
    """), {**params, "per": per_candidate})
    conn.execute(sa.text("""
        INSERT INTO ml_candidate_metadata (created_at, updated_at, candidate_id, name, value, project_id)
        SELECT c.created_at, c.created_at, c.id, 'mlflow.source.git.commit',
               md5(c.id::text || CAST(:seed AS text)), c.project_id
        FROM ml_candidates c
        WHERE abs(hashint8extended(c.id, :seed + 3)) % 5 = 0
    """), params)
