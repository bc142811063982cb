"""Slugs: any name in any script gives a valid, bounded, lower-case ASCII slug; unique per project."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.milestones import slug

NAMES = st.text(min_size=0, max_size=255)  # every Unicode category, emoji and controls included


@given(NAMES, st.integers(min_value=1, max_value=10**12))
@settings(max_examples=500)
def test_any_name_gives_a_slug_gitlab_accepts(name, iid):
    result, _base, _fell_back = slug.assign(name, iid, set())
    assert slug.is_valid_model_name(result)
    assert len(result) <= 255
    assert result == result.lower() and result.isascii()


@given(st.lists(st.tuples(st.integers(1, 3), NAMES), min_size=1, max_size=40), st.sets(st.text(max_size=20)))
@settings(max_examples=200)
def test_slugs_are_unique_in_a_project_and_never_take_an_existing_name(experiments, existing):
    rows = [(i + 1, project, i + 1, name) for i, (project, name) in enumerate(experiments)]
    taken = {project: set(existing) for project in (1, 2, 3)}
    assigned = slug.assign_all(rows, {p: set(names) for p, names in taken.items()})
    for project in (1, 2, 3):
        slugs = [assigned[r[0]][0] for r in rows if r[1] == project]
        assert len(slugs) == len(set(slugs))
        assert not set(slugs) & existing


@given(st.lists(NAMES, min_size=1, max_size=20))
def test_assignment_is_deterministic_whatever_the_input_order(names):
    rows = [(i + 1, 1, i + 1, name) for i, name in enumerate(names)]
    assert slug.assign_all(rows, {}) == slug.assign_all(list(reversed(rows)), {})


def test_worked_examples():
    taken = {"my_experiment"}
    examples = [
        ("My Experiment", "my_experiment_2"),  # the blueprint's example, taken by an existing model
        ("my experiment", "my_experiment_3"),
        ("Ünïcödé Straße", "unicode_strasse"),
        ("🚀 launch v2", "launch_v2"),
        ("日本語の実験", "experiment_9"),  # nothing left: experiment_<iid>
        ("!!!", "experiment_9_2"),  # same iid in this example, so the fallback itself collides
        ("[model]not-really-a-model", "model_not-really-a-model"),
        ("a.b-c_d", "a.b-c_d"),
        ("x" * 300, "x" * 255),
    ]
    for name, expected in examples:
        assert slug.assign(name, 9, taken)[0] == expected, name
    assert slug.with_suffix("y" * 255, 12) == "y" * 252 + "_12"


def test_the_model_name_rule_matches_gitlabs_examples():
    for good in ("my_experiment", "my-experiment", "a.b", "Model/With/Slashes", "@scope/name@1.0"):
        assert slug.is_valid_model_name(good), good
    for bad in ("", "a b", "a!", "modèle", "x" * 256):
        assert not slug.is_valid_model_name(bad), bad
