"""The contract every milestone keeps, and each milestone's own case of it.

``test_contract.py`` runs each property below for every milestone (and data profile):

- the dry run's count is what apply changes, and a second apply changes nothing;
- verify holds (every milestone so far);
- rollback gives the schema and the data back, and the milestone then applies again;
- a kill at a random batch of each data step resumes to the uninterrupted end state;
- what an application writes while the milestone runs ends up migrated.

A ``Case`` says what is particular to one milestone: what to note before it applies
(``capture``), what must hold after apply (``after_apply``) and after rollback
(``after_rollback``), and around a run beside the application writer. Its databases are
prepared by applying milestones 1..N-1 first (their order is the registry's, and every
registered milestone must have its case); ``States`` builds each state (before, applied,
rolled back) once per session, and each test works on a copy of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helpers import resolve_m1_anomalies, toolkit, toolkit_json

from toolkit.milestones import REGISTRY, slug
from toolkit.milestones.m1_packages import NAME as M1
from toolkit.milestones.m2_model_parent import NAME as M2
from toolkit.milestones.m3_models_for_experiments import NAME as M3
from toolkit.milestones.m4 import NAME as M4
from toolkit.sandbox.app_writer import AppWriter
from toolkit.schema.gitlab import PACKAGE_TYPE_GENERIC

MILESTONES = tuple(REGISTRY.milestones)  # the registered milestones, in order
PROFILES = ("realistic", "adversarial")
# Applies of adversarial data use it: their end state is what the kill test resumes to.
KILL_BATCH_SIZE = 4
ALL_PACKAGES = "SELECT * FROM packages_packages ORDER BY id"
EXPECTED_MODEL_ID = """SELECT c.id, e.model_id FROM ml_candidates c
                       JOIN ml_experiments e ON e.id = c.experiment_id ORDER BY c.id"""
CANDIDATES_FOLLOW_EXPERIMENTS = """SELECT count(*) FROM ml_candidates c JOIN ml_experiments e
                                   ON e.id = c.experiment_id WHERE c.model_id IS DISTINCT FROM e.model_id"""


def _nothing(*_: Any) -> None:
    return None


@dataclass
class Applied:
    """What the contract saw of one apply: the dry run's plan of the milestone, the
    migrate's exit code and document, and what ``capture`` noted before."""

    plan: dict
    code: int
    doc: dict
    captured: Any

    def passed(self, name: str) -> dict:
        return next(p for p in self.doc["passes"] if p["name"] == name)

    def step(self, name: str) -> dict:
        return next(s for s in self.plan["steps"] if s["step"] == name)


@dataclass(frozen=True)
class Case:
    milestone: str
    apply_batch_size: int  # realistic data; adversarial data applies with KILL_BATCH_SIZE
    profiles: tuple[str, ...] = PROFILES  # the data its apply and rollback are tested on
    rollback_batch_size: int | None = None
    capture: Callable[[Any], Any] = _nothing
    after_apply: Callable[[Any, Applied], None] = _nothing  # on a copy of its own: may write
    after_rollback: Callable[[Any, Any], None] = _nothing  # on the kept state: reads only
    rollback_moves_columns: bool = False  # a rebuilt column comes back last
    exact_tables: tuple[str, ...] = ()  # compared whole (timestamps too) after a kill and a resume
    # The run beside the application writer: its options, whether it verifies at once
    # (GitLab's new rows need nothing more from the toolkit), the writer's longest wait,
    # checks before the re-run that takes what came after the run's catch-up, and after it.
    writer_options: tuple[str, ...] = ()
    writer_run_verifies: bool = False
    writer_max_latency_s: float | None = None
    after_writer_run: Callable[[Any, AppWriter], None] = _nothing
    after_writer: Callable[[Any, AppWriter], None] = _nothing

    @property
    def number(self) -> int:
        return MILESTONES.index(self.milestone) + 1

    def batch_size(self, profile: str) -> int:
        return KILL_BATCH_SIZE if profile == "adversarial" else self.apply_batch_size


# -- milestone 1: candidate packages become ml_model packages ------------------------------
def _m1_capture(db) -> dict:
    return {"packages": db.rows(ALL_PACKAGES),
            "generic": db.scalar("SELECT count(*) FROM packages_packages WHERE package_type = 7")}


def _m1_after_apply(db, applied: Applied) -> None:
    step = applied.plan["steps"][0]
    assert step["rows"] > 0 and sum(step["breakdown"].values()) == step["rows"]
    assert db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == step["rows"]
    assert db.scalar("SELECT count(*) FROM packages_packages WHERE package_type = 7") == \
        applied.captured["generic"] - applied.doc["rows"]


def _m1_after_rollback(db, captured: dict) -> None:
    assert db.rows(ALL_PACKAGES) == captured["packages"]
    assert db.scalar("SELECT count(*) FROM toolkit.m1_converted_packages") == 0
    assert db.scalar("SELECT count(*) FROM toolkit.checkpoints") == 0


def _m1_after_writer(db, writer: AppWriter) -> None:
    assert db.scalar("""SELECT count(*) FROM ml_candidates c JOIN packages_packages p
                        ON p.id = c.package_id WHERE c.id = ANY(:c) AND p.package_type = :g""",
                     c=writer.candidates, g=PACKAGE_TYPE_GENERIC) == 0


# -- milestone 2: candidates get model_id ---------------------------------------------------
def _m2_after_apply(db, applied: Applied) -> None:
    expected = applied.captured
    with_model = sum(1 for _, model_id in expected if model_id is not None)
    assert applied.step("backfill-model-id")["rows"] == with_model > 0
    assert applied.passed("backfill-model-id")["rows"] == with_model
    assert db.rows("SELECT id, model_id FROM ml_candidates ORDER BY id") == expected
    # GitLab's later inserts get model_id from the trigger ...
    default_experiment = db.scalar("SELECT id FROM ml_experiments WHERE model_id IS NOT NULL ORDER BY id LIMIT 1")
    db.execute("""INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid, project_id)
                  SELECT now(), now(), id, gen_random_uuid(), project_id FROM ml_experiments WHERE id = :e""",
               e=default_experiment)
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE experiment_id = :e AND model_id IS NULL",
                     e=default_experiment) == 0
    # ... and moving a candidate to another experiment follows that experiment's model
    plain = db.scalar("SELECT id FROM ml_experiments WHERE model_id IS NULL ORDER BY id LIMIT 1")
    moved = db.scalar("SELECT max(id) FROM ml_candidates WHERE experiment_id = :e", e=default_experiment)
    db.execute("UPDATE ml_candidates SET experiment_id = :p WHERE id = :c", p=plain, c=moved)
    assert db.scalar("SELECT model_id FROM ml_candidates WHERE id = :c", c=moved) is None
    assert toolkit(db, "verify", M2).exit_code == 0


def _m2_after_writer(db, writer: AppWriter) -> None:
    # the writer's runs of default experiments (every other one) have their model
    assert db.scalar("SELECT count(*) FROM ml_candidates c JOIN ml_experiments e ON e.id = c.experiment_id "
                     "WHERE c.id = ANY(:c) AND e.model_id IS NOT NULL", c=writer.candidates) > 0
    assert db.scalar(CANDIDATES_FOLLOW_EXPERIMENTS + " AND c.id = ANY(:c)", c=writer.candidates) == 0


# -- milestone 3: every experiment gets a display-named model -------------------------------
def _m3_capture(db) -> dict:
    return {"names": db.rows("SELECT id, name FROM ml_experiments ORDER BY id"),
            "without": db.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL")}


def _m3_after_apply(db, applied: Applied) -> None:
    without = applied.captured["without"]
    plan = applied.step("create-models-for-experiments")
    assert plan["rows"] == without > 0
    announced = {r["experiment_id"]: r["slug"] for a in plan["anomalies"] if a["kind"].startswith("slug")
                 for r in a["rows"]}
    assert applied.passed("create-models-for-experiments")["rows"] == without
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL") == 0
    assert db.rows("SELECT id, name FROM ml_experiments ORDER BY id") == applied.captured["names"]  # names kept
    created = {r.experiment_id: r for r in db.rows("""
        SELECT e.id AS experiment_id, e.name AS experiment_name, e.iid, m.name, m.display_name,
               m.project_id = e.project_id AS same_project, m.user_id IS NOT DISTINCT FROM e.user_id AS same_user,
               m.created_at = e.created_at AS same_created
        FROM toolkit.m3_created_models l JOIN ml_models m ON m.id = l.model_id
        JOIN ml_experiments e ON e.id = l.experiment_id""")}
    assert len(created) == without
    for exp_id, row in created.items():
        assert row.display_name == row.experiment_name
        assert slug.is_valid_model_name(row.name)
        assert row.same_project and row.same_user and row.same_created
        if exp_id in announced:
            assert row.name == announced[exp_id]
        else:
            assert row.name == slug.base_slug(row.experiment_name)
    assert db.scalar("SELECT bool_and(display_name = name) FROM ml_models WHERE id NOT IN "
                     "(SELECT model_id FROM toolkit.m3_created_models)")
    # metadata followed the experiments to their models
    assert db.scalar("""SELECT count(*) FROM ml_experiment_metadata em JOIN ml_experiments e ON e.id = em.experiment_id
                        WHERE NOT EXISTS (SELECT 1 FROM ml_model_metadata mm
                                          WHERE mm.model_id = e.model_id AND mm.name = em.name)""") == 0
    assert db.scalar(CANDIDATES_FOLLOW_EXPERIMENTS) == 0


def _m3_after_rollback(db, _captured: dict) -> None:
    assert db.scalar("SELECT count(*) FROM toolkit.m3_created_models") == 0
    assert db.scalar("SELECT count(*) FROM toolkit.m3_metadata_clashes") == 0


def _m3_after_writer_run(db, writer: AppWriter) -> None:
    during = db.scalar("SELECT count(*) FROM toolkit.m3_created_models WHERE experiment_id = ANY(:e)",
                       e=writer.new_experiments)
    assert during > 0  # the catch-up rounds took experiments written during the run


def _m3_after_writer(db, writer: AppWriter) -> None:
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE id = ANY(:e) AND model_id IS NULL",
                     e=writer.new_experiments) == 0
    assert db.scalar("SELECT count(*) FROM ml_experiments WHERE model_id IS NULL") == 0
    assert db.scalar(CANDIDATES_FOLLOW_EXPERIMENTS) == 0


# -- milestone 4: experiment tables archived and dropped -------------------------------------
SEQUENCES = "SELECT last_value, is_called FROM ml_experiments_id_seq"
ARCHIVE = ("toolkit.m4_archive_ml_experiments", "toolkit.m4_archive_ml_experiment_metadata",
           "toolkit.m4_archive_candidate_experiments")


def _m4_capture(db) -> list:
    return db.rows(SEQUENCES)


def _m4_after_apply(db, applied: Applied) -> None:
    assert db.scalar("SELECT to_regclass('ml_experiments') IS NULL AND to_regclass('ml_experiment_metadata') IS NULL")
    assert db.scalar("SELECT count(*) FROM information_schema.columns WHERE table_name = 'ml_candidates' "
                     "AND column_name = 'experiment_id'") == 0
    assert db.scalar("SELECT is_nullable FROM information_schema.columns WHERE table_name = 'ml_candidates' "
                     "AND column_name = 'model_id'") == "NO"
    assert toolkit(db, "verify").exit_code == 0  # every milestone still verifies after cleanup
    # each experiment's MLflow id is kept for good, written in the drop's own transaction
    assert db.rows("SELECT id, project_id, iid, model_id, name FROM toolkit.mlflow_experiment_ids ORDER BY id") == \
        db.rows("SELECT id, project_id, iid, model_id, name FROM toolkit.m4_archive_ml_experiments ORDER BY id")


def _m4_after_rollback(db, sequences: list) -> None:
    assert db.rows(SEQUENCES) == sequences
    assert db.scalar("SELECT to_regclass('toolkit.m4_archive_ml_experiments') IS NULL")
    assert db.scalar("SELECT count(*) FROM toolkit.mlflow_experiment_ids") == 0  # the experiments are back


def _m4_after_writer(db, writer: AppWriter) -> None:
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE model_id IS NULL") == 0
    assert toolkit(db, "rollback", M4).exit_code == 0
    # every candidate, those written during and after the cleanup too, has its experiment back
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE experiment_id IS NULL") == 0
    assert db.scalar(CANDIDATES_FOLLOW_EXPERIMENTS) == 0


CASES = {case.milestone: case for case in (
    Case(M1, apply_batch_size=25, rollback_batch_size=7, capture=_m1_capture,
         after_apply=_m1_after_apply, after_rollback=_m1_after_rollback,
         writer_options=("--batch-size", "15", "--pause-ms", "10"), after_writer=_m1_after_writer),
    Case(M2, apply_batch_size=40, capture=lambda db: db.rows(EXPECTED_MODEL_ID),
         after_apply=_m2_after_apply,
         # Inserts are never queued behind the backfill: row-level locks on other rows do not
         # conflict with an INSERT, and each DDL lock is held for milliseconds.
         writer_options=("--batch-size", "10", "--pause-ms", "30"), writer_run_verifies=True,
         writer_max_latency_s=1.0, after_writer=_m2_after_writer),
    Case(M3, apply_batch_size=7, rollback_batch_size=4, capture=_m3_capture,
         after_apply=_m3_after_apply, after_rollback=_m3_after_rollback,
         writer_options=("--batch-size", "3", "--pause-ms", "20"),
         after_writer_run=_m3_after_writer_run, after_writer=_m3_after_writer),
    Case(M4, apply_batch_size=20, profiles=("adversarial",), rollback_batch_size=20, capture=_m4_capture,
         after_apply=_m4_after_apply, after_rollback=_m4_after_rollback, rollback_moves_columns=True,
         exact_tables=ARCHIVE, writer_options=("--batch-size", "10", "--pause-ms", "5"),
         writer_run_verifies=True, after_writer=_m4_after_writer),
)}
# A milestone registered without its case would go untested: refuse it here, at collection.
assert set(CASES) == set(MILESTONES), f"milestones without a contract case: {set(MILESTONES) - set(CASES)}"


def apply_result(code: int, doc: dict) -> dict:
    """A migrate's document, whether it verified or not."""
    return doc["result"] if code == 0 else doc["error"]["details"]["result"]


@dataclass
class States:
    """Each milestone's states, per data profile, built on first use and kept for the
    session (``session_database``): before (milestones 1..N-1 applied), applied, and
    rolled back. Tests read them, or copy them with ``make_database(like=...)`` to write."""

    make: Callable[..., Any]
    _before: dict = field(default_factory=dict)
    _applied: dict = field(default_factory=dict)
    _rolled_back: dict = field(default_factory=dict)

    def before(self, profile: str, n: int):
        """Prepared: milestone 1's blocking anomalies resolved (adversarial data), then
        milestones 1..n-1 applied: milestone n-1's applied state."""
        key = (profile, n)
        if key not in self._before:
            if n == 1:
                db = self.make(f"{profile}:small")
                if profile == "adversarial":
                    resolve_m1_anomalies(db)
                db.dispose()
            else:  # milestone n-1's applied state
                db, applied = self.applied(profile, n - 1)
                assert applied.code == 0, applied.doc
            self._before[key] = db
        return self._before[key]

    def applied(self, profile: str, n: int) -> tuple[Any, Applied]:
        """The milestone applied once, in batches, after its dry run."""
        key = (profile, n)
        if key not in self._applied:
            case = CASES[MILESTONES[n - 1]]
            db = self.make(like=self.before(profile, n))
            captured = case.capture(db)
            code, planned = toolkit_json(db, "plan", case.milestone)
            assert code == 0, planned
            code, doc = toolkit_json(db, "migrate", case.milestone, "--yes",
                                     "--batch-size", str(case.batch_size(profile)))
            db.dispose()
            self._applied[key] = db, Applied(planned["result"]["milestones"][0], code, apply_result(code, doc),
                                             captured)
        return self._applied[key]

    def rolled_back(self, profile: str, n: int) -> tuple[Any, Any]:
        """The applied state rolled back; with the rollback's CLI result."""
        key = (profile, n)
        if key not in self._rolled_back:
            case = CASES[MILESTONES[n - 1]]
            applied, _ = self.applied(profile, n)
            db = self.make(like=applied)
            batch = ("--batch-size", str(case.rollback_batch_size)) if case.rollback_batch_size else ()
            result = toolkit(db, "rollback", case.milestone, *batch)
            db.dispose()
            self._rolled_back[key] = db, result
        return self._rolled_back[key]

