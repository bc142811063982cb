"""The adversarial profile: every awkward case DESIGN.md §5 names, on top of realistic data.

Each case is labelled in a comment with the milestone it is aimed at; the tests in
``tests/test_generator.py`` check that every case is present in a seeded database, so a
later refactoring of the generator cannot quietly lose one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from toolkit.sandbox.realistic import Entities
from toolkit.sandbox.rows import GENERIC, ML_MODEL, Builder, Experiment
from toolkit.schema.gitlab import CANDIDATE_STATUSES, PACKAGE_STATUSES, PACKAGE_TYPES

SQL_LOOKING = "Robert'); DROP TABLE ml_experiments; --"
LONG_ASCII_NAME = "x" * 255
LONG_UNICODE_NAME = "Ü" * 254 + "🚀"  # 255 characters, 511 bytes
# Names that collide once slugged (M3): with each other and with an existing model.
COLLIDING_NAMES = ("My Experiment", "my experiment", "MY_EXPERIMENT", "My  Experiment!", "my-experiment")
EXISTING_MODEL_NAME = "my_experiment"
# Names with nothing left after slugging to ASCII (M3 fallback).
NOTHING_LEFT_NAMES = ("!!!", "日本語の実験", "🔥🔥🔥", "   ", "Эксперимент", "تجربة")
ODD_NAMES = ("🚀 launch v2", "Ünïcödé Straße", "tab\there", "new\nline", "back\\slash", "quote\"d",
             "percent %s and {braces}", "[model]not-really-a-model", "ml_experiment_1")
# Members (developers of the first project) whose tokens GitLab refuses, by users.state.
UNUSABLE_USERS = {"blocked-user": "blocked", "deactivated-user": "deactivated",
                  "pending-user": "blocked_pending_approval"}
ADMIN_USERNAME = "admin-user"  # users.admin, member of no project


def add_adversarial_rows(b: Builder, base: Entities) -> None:
    """Every adversarial case, in a fixed order (the ids are explicit and the builder's
    random draws sequential, so the order is part of what makes the data reproducible)."""
    site = _Site(b, base.created_at + timedelta(days=1), base.users[0], base.projects[0],
                 base.projects[1 % len(base.projects)])
    named, default_exp, old_default = _slug_cases(site)
    target = named[0]
    _blocking_and_shared_packages(site, target)
    _package_statuses_and_versions(site, target)
    _edge_candidates(site, target)

    # --- candidates in experiments with odd names, and a default experiment's candidates ---
    for exp in [*named[4:], default_exp, old_default]:
        site.candidate(exp)

    # --- identities GitLab's API refuses though they are members, and an admin who is not --
    for username, state in UNUSABLE_USERS.items():
        b.authorize(b.user(username, state=state), site.project, 30)
    b.user(ADMIN_USERNAME, admin=True)


@dataclass(frozen=True)
class _Site:
    """Where the cases are made: one moment after the realistic rows, a user, the first
    project and another one."""

    b: Builder
    at: datetime
    user: int
    project: int
    other_project: int

    def candidate(self, exp: Experiment, **kw: Any) -> tuple[int, int | None]:
        """A finished, unnamed candidate of the site's user, unless ``kw`` says otherwise."""
        kw.setdefault("user_id", self.user)
        kw.setdefault("status", CANDIDATE_STATUSES["finished"])
        kw.setdefault("name", None)
        return self.b.candidate(exp, self.at, **kw)

    def legacy_package(self, target: Experiment, version: str | None, **kw: Any) -> int:
        """A generic package named as a candidate's of ``target`` was (``ml_experiment_<iid>``)."""
        return self.b.package(self.project, f"ml_experiment_{target.iid}", version, GENERIC, self.at, **kw)


def _slug_cases(site: _Site) -> tuple[list[Experiment], Experiment, Experiment]:
    """Milestone 3's cases: experiment names that collide once slugged (one with an existing
    model), slug to nothing, are odd, long or SQL-looking; a metadata clash between a default
    experiment and its model; an older-style default experiment named like its model. The
    named experiments (the first is the one the package cases hang from), the default
    experiment and the older-style one."""
    b, at, user, project = site.b, site.at, site.user, site.project
    # --- M3: names that collide after slugging, one of them with an existing model ---------
    existing_model = b.model(project, EXISTING_MODEL_NAME, at, user)
    default_exp = b.experiment(project, f"[model]{EXISTING_MODEL_NAME}", at, user,
                               model_id=existing_model, model_name=EXISTING_MODEL_NAME)
    # --- M3: metadata clash between a default experiment and its model ---------------------
    b.experiment_metadata(default_exp, "owner", "alice")
    b.model_metadata(existing_model, project, "owner", "bob", at)  # clash: differs
    b.experiment_metadata(default_exp, "license", "MIT")
    b.model_metadata(existing_model, project, "license", "MIT", at)  # same value: no clash

    # --- M3: an older-style default experiment named exactly like its model ---------------
    old_model = b.model(project, "legacy-model", at, None)
    old_default = b.experiment(project, "legacy-model", at, None, model_id=old_model,
                               model_name="legacy-model")

    named = [b.experiment(project, name, at, user) for name in COLLIDING_NAMES]
    named += [b.experiment(project, name, at, None) for name in NOTHING_LEFT_NAMES]
    named += [b.experiment(site.other_project, name, at, user) for name in ODD_NAMES]
    named.append(b.experiment(project, LONG_ASCII_NAME, at, user))
    named.append(b.experiment(project, LONG_UNICODE_NAME, at, user))
    named.append(b.experiment(project, SQL_LOOKING, at, user, deleted_on=at))  # soft-deleted
    # --- M3: a long name whose slug, truncated to 255, collides with another's ------------
    named.append(b.experiment(project, "y" * 255, at, user))
    named.append(b.experiment(project, "y" * 254 + "!", at, user))
    for exp in named[:4]:
        b.experiment_metadata(exp, "purpose", SQL_LOOKING)
    b.experiment_metadata(named[0], "notes", "n" * 5000)  # maximum-length value
    b.experiment_metadata(named[1], "e" * 255, "maximum-length key")
    return named, default_exp, old_default


def _blocking_and_shared_packages(site: _Site, target: Experiment) -> None:
    """Milestone 1's packages that block a conversion, or only look as if they would."""
    b, at, project = site.b, site.at, site.project
    # --- M1: a legacy generic package in another project than its candidate (blocks) ------
    iid = b.peek_candidate_iid(target.project_id)
    cross = b.package(site.other_project, f"ml_experiment_{target.iid}", str(iid), GENERIC, at)
    site.candidate(target, package_id=cross)

    # --- M1: one generic package shared by two candidates (warning, converted) -------------
    iid = b.peek_candidate_iid(target.project_id)
    shared = site.legacy_package(target, str(iid))
    site.candidate(target, package_id=shared)
    site.candidate(target, package_id=shared)

    # --- M1: conversion that would collide with an existing ml_model package (blocks) ------
    iid = b.peek_candidate_iid(target.project_id)
    clash = site.legacy_package(target, str(iid))
    b.package(project, f"ml_experiment_{target.iid}", str(iid), ML_MODEL, at)
    site.candidate(target, package_id=clash)
    # ...and the same shape where the ml_model twin is pending destruction: no collision.
    iid = b.peek_candidate_iid(target.project_id)
    no_clash = site.legacy_package(target, str(iid))
    b.package(project, f"ml_experiment_{target.iid}", str(iid), ML_MODEL, at,
              status=PACKAGE_STATUSES["pending_destruction"])
    site.candidate(target, package_id=no_clash)
    # ...and two generic candidate packages that collide with each other once converted,
    # which the generic index allowed because one is pending destruction: no collision.
    iid = b.peek_candidate_iid(target.project_id)
    for status in (PACKAGE_STATUSES["pending_destruction"], PACKAGE_STATUSES["default"]):
        pkg = site.legacy_package(target, f"dup-{iid}", status=status)
        site.candidate(target, package_id=pkg)
    # ...and two generic packages, in different rows, that become the same ml_model key:
    # a version rule violation plus a NULL version (NULLs never collide in a unique index).
    null_version = site.legacy_package(target, None)
    site.candidate(target, package_id=null_version)
    null_version_2 = site.legacy_package(target, None)
    site.candidate(target, package_id=null_version_2)


def _package_statuses_and_versions(site: _Site, target: Experiment) -> None:
    """Milestone 1's generic candidate packages in every status, with each version
    convention, and a candidate's package of another type."""
    b, at, project = site.b, site.at, site.project
    # --- M1: every package status on a generic candidate package -----------------------------
    for status in PACKAGE_STATUSES.values():
        iid = b.peek_candidate_iid(target.project_id)
        pkg = site.legacy_package(target, str(iid), status=status,
                                  status_message="x" * 300 if status == 3 else None)
        site.candidate(target, package_id=pkg)
    # ...a version GitLab's ml_model rule accepts (semver) and the oldest `-` convention.
    semver = site.legacy_package(target, "1.2.3")
    site.candidate(target, package_id=semver)
    cid = b.next_candidate_id()
    oldest = b.package(project, f"ml_candidate_{cid}", "-", GENERIC, at, creator_id=None)
    site.candidate(target, package_id=oldest)

    # --- M1: a candidate linked to a package of another type (never converted) ------------
    pypi = b.package(project, "weird-candidate-artifact", "0.1.0", PACKAGE_TYPES["pypi"], at)
    site.candidate(target, package_id=pypi)


def _edge_candidates(site: _Site, target: Experiment) -> None:
    """Candidates at the schema's edges: NULLs wherever allowed, maximum lengths,
    SQL-looking values, a duplicate iid, and metric values PostgreSQL stores oddly."""
    b, at, project = site.b, site.at, site.project
    # --- NULLs wherever the schema allows them ---------------------------------------------
    site.candidate(target, user_id=None, name=None, internal_id=None, start_time=None, end_time=None,
                   status=CANDIDATE_STATUSES["running"])
    # --- maximum lengths and SQL-looking values on a candidate ------------------------------
    long_named, _ = site.candidate(target, name="c" * 255)
    sql_named, sql_iid = site.candidate(target, name=SQL_LOOKING)
    # --- duplicate per-project iid (the index is not unique) -------------------------------
    site.candidate(target, internal_id=sql_iid)
    for cid in (long_named, sql_named):
        b.sink.add("ml_candidate_params", created_at=at, updated_at=at, candidate_id=cid,
                   name="p" * 250, value="v" * 250, project_id=project)
        b.sink.add("ml_candidate_params", created_at=at, updated_at=at, candidate_id=cid,
                   name="sql", value=SQL_LOOKING[:250], project_id=project)
        b.sink.add("ml_candidate_metadata", created_at=at, updated_at=at, candidate_id=cid,
                   name="mlflow.note.content", value="t" * 5000, project_id=project)
        for step, value in enumerate((None, float("inf"), float("-inf"), 0.0, -1e308)):
            b.sink.add("ml_candidate_metrics", created_at=at, updated_at=at, candidate_id=cid,
                       value=value, step=step if step else None,
                       is_nan=b"\x01" if value is None else None, name="edge",
                       tracked_at=None if step == 0 else step, project_id=project)
