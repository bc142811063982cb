"""An application-like session writes while each milestone runs; afterwards everything it
wrote is migrated and every milestone so far verifies (its MLflow view check included).

The application is GitLab as each milestone expects it to be deployed: it creates generic
candidate packages until milestone 1 is done and ml_model ones after; it creates
experiments until milestone 3 is done, and from milestone 4 on only logs runs.
"""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa
from helpers import toolkit

from toolkit import milestones as registry
from toolkit.engine.batches import RunOptions
from toolkit.engine.runner import Runner
from toolkit.schema.gitlab import PACKAGE_TYPE_GENERIC, PACKAGE_TYPE_ML_MODEL

MILESTONES = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")


class Application(threading.Thread):
    """Logs a run (candidate, params, metrics, tag, package) every few milliseconds and
    creates an experiment every fifth time; counts what it wrote and what failed."""

    def __init__(self, url: sa.URL, *, package_type: int, experiments: bool):
        super().__init__()
        self.url, self.package_type, self.experiments = url, package_type, experiments
        self.stop = threading.Event()
        self.candidates: list[int] = []
        self.new_experiments: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        engine = sa.create_engine(self.url)
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                with engine.begin() as conn:
                    self._log_run(conn, n)
            except sa.exc.DBAPIError as exc:  # e.g. the instant milestone 4 drops the column
                self.errors.append(str(exc.orig).splitlines()[0])
            time.sleep(0.01)
        engine.dispose()

    def _log_run(self, conn: sa.Connection, n: int) -> None:
        has_experiments = conn.execute(sa.text("""
            SELECT count(*) = 1 FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass
              AND attname = 'experiment_id' AND NOT attisdropped""")).scalar()
        if self.experiments and n % 5 == 0:
            self.new_experiments.append(conn.execute(sa.text("""
                INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
                SELECT now(), now(), max(iid) + 1, project_id, 'Live ' || :n || ' ' || max(iid)
                FROM ml_experiments WHERE project_id = (SELECT min(id) FROM projects)
                GROUP BY project_id RETURNING id"""), {"n": n}).scalar())
        if has_experiments:
            parent = conn.execute(sa.text("""
                SELECT e.id, e.iid, e.project_id, e.model_id FROM ml_experiments e
                ORDER BY e.id DESC LIMIT 1 OFFSET :k"""), {"k": n % 7}).one()
        else:  # after the cleanup: a model is the parent
            parent = conn.execute(sa.text("""
                SELECT NULL, m.id, m.project_id, m.id FROM ml_models m
                ORDER BY m.id DESC LIMIT 1 OFFSET :k"""), {"k": n % 7}).one()
        experiment_id, iid, project_id, model_id = parent
        candidate_iid = conn.execute(sa.text(
            "SELECT COALESCE(max(internal_id), 0) + 1 FROM ml_candidates WHERE project_id = :p"),
            {"p": project_id}).scalar()
        package = conn.execute(sa.text("""
            INSERT INTO packages_packages (created_at, updated_at, project_id, name, version, package_type)
            VALUES (now(), now(), :p, :name, :v, :t) RETURNING id"""),
            {"p": project_id, "name": f"ml_experiment_{iid}", "v": str(candidate_iid),
             "t": self.package_type}).scalar()
        # Before the cleanup GitLab names the experiment (milestone 2's trigger fills
        # model_id); the version deployed for milestone 4 sets model_id itself.
        parents = {"experiment_id": experiment_id} if has_experiments else {}
        if not self.experiments:
            parents["model_id"] = model_id
        candidate = conn.execute(sa.text(f"""
            INSERT INTO ml_candidates (created_at, updated_at, {", ".join(parents)}, eid, project_id,
                                       internal_id, package_id, name, status)
            VALUES (now(), now(), {", ".join(f":{c}" for c in parents)}, gen_random_uuid(), :p, :ci,
                    :pkg, :name, 0) RETURNING id"""),
            {**parents, "p": project_id, "ci": candidate_iid, "pkg": package, "name": f"live-run-{n}"}).scalar()
        conn.execute(sa.text("""
            INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value, project_id)
            VALUES (now(), now(), :c, 'lr', '0.01', :p), (now(), now(), :c, 'depth', '6', :p)"""),
            {"c": candidate, "p": project_id})
        conn.execute(sa.text("""
            INSERT INTO ml_candidate_metrics (created_at, updated_at, candidate_id, name, value, step,
                                              tracked_at, project_id)
            SELECT now(), now(), :c, 'loss', 1.0 / s, s, s, :p FROM generate_series(1, 3) s"""),
            {"c": candidate, "p": project_id})
        conn.execute(sa.text("""
            INSERT INTO ml_candidate_metadata (created_at, updated_at, candidate_id, name, value, project_id)
            VALUES (now(), now(), :c, 'mlflow.source.name', 'train.py', :p)"""),
            {"c": candidate, "p": project_id})
        self.candidates.append(candidate)


def test_everything_the_application_writes_during_each_milestone_ends_up_migrated(realistic_db):
    db = realistic_db
    wrote = {}
    for milestone in MILESTONES:
        app = Application(db.engine.url,
                          package_type=PACKAGE_TYPE_GENERIC if milestone == "milestone-1" else PACKAGE_TYPE_ML_MODEL,
                          experiments=milestone != "milestone-4")
        app.start()
        try:
            chosen = registry.get(milestone)
            result = Runner(db.engine, RunOptions(batch_size=15, pause_ms=10), plan=registry.plan()).migrate(chosen)
            time.sleep(0.3)  # and some more after it finished
        finally:
            app.stop.set()
            app.join(30)
        assert result.complete
        assert len(app.candidates) > 10, (milestone, app.errors)
        # what milestone 4 drops can fail an insert at the instant it goes; nothing else may
        assert all("experiment_id" in e or "ml_experiments" in e for e in app.errors), app.errors
        assert len(app.errors) <= 2, app.errors
        wrote[milestone] = len(app.candidates) + len(app.new_experiments)
        # a re-run takes what was written after the run's catch-up rounds
        rerun = toolkit(db, "migrate", milestone, "--yes")
        assert rerun.exit_code == 0, (milestone, rerun.output)
        for done in MILESTONES[:MILESTONES.index(milestone) + 1]:
            verified = toolkit(db, "verify", done)
            assert verified.exit_code == 0, (milestone, done, verified.output)
        if milestone == "milestone-1":
            assert db.scalar("""SELECT count(*) FROM ml_candidates c JOIN packages_packages p
                                ON p.id = c.package_id WHERE c.id = ANY(:c) AND p.package_type = :g""",
                             c=app.candidates, g=PACKAGE_TYPE_GENERIC) == 0
        if milestone == "milestone-3":
            assert db.scalar("SELECT count(*) FROM ml_experiments WHERE id = ANY(:e) AND model_id IS NULL",
                             e=app.new_experiments) == 0
        assert db.scalar("SELECT count(*) FROM ml_candidates WHERE id = ANY(:c)", c=app.candidates) == \
            len(app.candidates)
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE model_id IS NULL") == 0
    assert all(n > 10 for n in wrote.values()), wrote
