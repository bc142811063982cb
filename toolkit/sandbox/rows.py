"""GitLab-shaped rows built in Python with explicit ids and streamed with COPY.

:class:`Builder` adds a row of each GitLab table the sandbox fills, with GitLab's
per-project iid sequences (experiments, candidates); :class:`CopySink` buffers them per
table and writes each buffer with COPY when it fills, so memory stays flat at any scale.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import psycopg
from sqlalchemy.engine import Connection

from toolkit.schema.gitlab import CANDIDATE_STATUSES, PACKAGE_TYPES

BASE_TIME = datetime(2023, 6, 1, tzinfo=UTC)

# the columns of each table, in the order COPY writes them
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
FILES = ("model.pkl", "metrics.json", "requirements.txt", "conda.yaml", "MLmodel", "weights.bin")


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
