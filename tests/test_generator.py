"""The data generator: deterministic by seed, realistic shapes, every adversarial case present."""

from __future__ import annotations

import pytest

from toolkit.sandbox.adversarial import (
    COLLIDING_NAMES,
    EXISTING_MODEL_NAME,
    LONG_UNICODE_NAME,
    NOTHING_LEFT_NAMES,
    SQL_LOOKING,
)
from toolkit.sandbox.generator import seed_database
from toolkit.sandbox.legacy_schema import ALL_TABLES
from toolkit.sandbox.scales import SCALES
from toolkit.verify.digest import digests


def _seeded_digests(db, profile: str, seed: int) -> dict:
    with db.engine.connect() as conn:
        seed_database(conn, SCALES["small"], profile, seed)
        return {t: (d.rows, d.digest) for t, d in digests(conn, ALL_TABLES).items()}


@pytest.mark.parametrize("profile", ["realistic", "adversarial"])
def test_same_seed_gives_the_same_data_and_another_seed_does_not(make_database, profile):
    first = _seeded_digests(make_database("empty"), profile, seed=7)
    second = _seeded_digests(make_database("empty"), profile, seed=7)
    other = _seeded_digests(make_database("empty"), profile, seed=8)
    assert first == second
    assert first != other
    changed = {t for t in ALL_TABLES if first[t] != other[t]}
    assert {"ml_candidates", "ml_candidate_metrics", "ml_candidate_params"} <= changed


def test_realistic_small_has_the_shapes_the_milestones_need(realistic_db):
    db = realistic_db
    assert db.scalar("SELECT count(DISTINCT project_id) FROM ml_experiments") == SCALES["small"].projects
    # models with their default experiments named [model]<name>
    assert db.scalar("""SELECT count(*) FROM ml_models m JOIN ml_experiments e ON e.model_id = m.id
                        WHERE e.name = '[model]' || m.name""") == db.scalar("SELECT count(*) FROM ml_models")
    # per-project iids: experiments unique, candidates a 1..n sequence per project
    assert db.scalar("""SELECT bool_and(n = mx) FROM (SELECT project_id, count(*) n, max(internal_id) mx
                        FROM ml_candidates GROUP BY project_id) s""")
    # the three package conventions
    generic = db.rows("""SELECT p.name, p.version, c.internal_id, e.iid, c.id FROM ml_candidates c
                         JOIN packages_packages p ON p.id = c.package_id
                         JOIN ml_experiments e ON e.id = c.experiment_id WHERE p.package_type = 7""")
    assert generic
    for name, version, cand_iid, exp_iid, cand_id in generic:
        assert (name, version) in {(f"ml_experiment_{exp_iid}", str(cand_iid)), (f"ml_candidate_{cand_id}", "-")}
    assert db.scalar("""SELECT count(*) FROM ml_candidates c JOIN packages_packages p ON p.id = c.package_id
                        WHERE p.package_type = 14 AND p.version = 'candidate_' || c.internal_id""") > 0
    assert db.scalar("""SELECT count(*) FROM ml_model_versions v JOIN packages_packages p ON p.id = v.package_id
                        JOIN ml_models m ON m.id = v.model_id
                        WHERE p.name = m.name AND p.version = v.version AND v.version ~ '^\\d+\\.0\\.0$'""") > 0
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE model_version_id IS NOT NULL") > 0
    assert db.scalar("SELECT count(*) FROM packages_package_files") > db.scalar("SELECT count(*) FROM packages_packages")
    assert db.scalar("SELECT count(DISTINCT status) FROM ml_candidates") == 5
    # metric histories over steps, params, metadata
    assert db.scalar("SELECT max(step) FROM ml_candidate_metrics") > 3
    assert db.scalar("SELECT count(*) FROM ml_candidate_params") > db.scalar("SELECT count(*) FROM ml_candidates")
    assert db.scalar("SELECT count(*) FROM ml_experiment_metadata") > 0
    assert db.scalar("SELECT count(*) FROM ml_candidate_metadata") > 0
    # packages the toolkit must never touch
    assert db.scalar("SELECT count(DISTINCT package_type) FROM packages_packages") >= 5


def test_adversarial_profile_contains_every_case(adversarial_db):
    db = adversarial_db
    names = {r[0] for r in db.rows("SELECT name FROM ml_experiments")}
    assert set(COLLIDING_NAMES) <= names
    assert set(NOTHING_LEFT_NAMES) <= names
    assert LONG_UNICODE_NAME in names and len(LONG_UNICODE_NAME) == 255
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE char_length(name) = 255") >= 3
    assert SQL_LOOKING in names
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE name ~ '[^\\x01-\\x7f]'") >= 5
    assert db.scalar("SELECT count(*) FROM ml_models WHERE name = :n", n=EXISTING_MODEL_NAME) == 1
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE deleted_on IS NOT NULL") >= 1
    # M1: cross-project candidate package
    assert db.scalar("""SELECT count(*) FROM ml_candidates c JOIN packages_packages p ON p.id = c.package_id
                        WHERE p.project_id <> c.project_id AND p.package_type = 7""") >= 1
    # M1: a generic package shared by several candidates
    assert db.scalar("""SELECT count(*) FROM (SELECT package_id FROM ml_candidates
                        WHERE package_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1) s""") >= 1
    # M1: a generic candidate package whose ml_model twin (status <> 4) exists
    assert db.scalar("""SELECT count(*) FROM ml_candidates c
                        JOIN packages_packages g ON g.id = c.package_id AND g.package_type = 7
                        JOIN packages_packages m ON m.package_type = 14 AND m.project_id = g.project_id
                         AND m.name = g.name AND m.version = g.version AND m.status <> 4
                        WHERE g.status <> 4""") >= 1
    # M1: every package status, a NULL version, a semver version, a non-generic candidate package
    assert db.scalar("""SELECT count(DISTINCT p.status) FROM ml_candidates c
                        JOIN packages_packages p ON p.id = c.package_id WHERE p.package_type = 7""") == 6
    assert db.scalar("""SELECT count(*) FROM ml_candidates c JOIN packages_packages p ON p.id = c.package_id
                        WHERE p.package_type = 7 AND p.version IS NULL""") >= 2
    assert db.scalar("""SELECT count(*) FROM ml_candidates c JOIN packages_packages p ON p.id = c.package_id
                        WHERE p.package_type NOT IN (7, 14)""") >= 1
    # M3: metadata clash between a default experiment and its model
    assert db.scalar("""SELECT count(*) FROM ml_experiment_metadata em
                        JOIN ml_experiments e ON e.id = em.experiment_id
                        JOIN ml_model_metadata mm ON mm.model_id = e.model_id AND mm.name = em.name
                        WHERE mm.value <> em.value""") >= 1
    # NULLs wherever allowed, duplicates the schema permits, maximum lengths
    for column in ("user_id", "start_time", "end_time", "name", "package_id", "internal_id",
                   "ci_build_id", "model_version_id"):
        assert db.scalar(f"SELECT count(*) FROM ml_candidates WHERE {column} IS NULL") >= 1, column
    assert db.scalar("SELECT count(*) FROM ml_candidate_metrics WHERE value IS NULL") >= 1
    assert db.scalar("SELECT count(*) FROM ml_candidate_metrics WHERE value = 'Infinity'") >= 1
    assert db.scalar("""SELECT count(*) FROM (SELECT project_id, internal_id FROM ml_candidates
                        WHERE internal_id IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1) s""") >= 1
    assert db.scalar("SELECT max(char_length(value)) FROM ml_experiment_metadata") == 5000
    assert db.scalar("SELECT max(char_length(value)) FROM ml_candidate_params") == 250
    assert db.scalar("SELECT count(*) FROM ml_candidate_params WHERE value LIKE '%DROP TABLE%'") >= 1
