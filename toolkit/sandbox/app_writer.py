"""An application-like writer: GitLab logging MLflow runs while a milestone runs.

One thread, one transaction per write, every ``interval_s``: a run (a candidate with its
package, two params, three metric steps and a tag) of one of the latest experiments (every
other run, of one whose model it is), and, every ``experiment_every``-th time, an
experiment first. It is GitLab as deployed for the milestone that runs:

- it creates generic candidate packages until milestone 1 is done, ``ml_model`` ones after;
- it takes iids from ``internal_ids`` as GitLab does (so it and ``toolkit mlflow serve
  --allow-writes`` never hand out the same one);
- it creates experiments until milestone 3 is done; the version deployed for milestone 4
  only logs runs and sets ``model_id`` itself, and once ``experiment_id`` is gone a
  model is the run's parent.

The tests use it to show that what the application writes during a run ends up migrated;
``scripts/bench.py`` uses it to measure the latency GitLab's traffic would see. Failures
are counted, never raised: the instant milestone 4 drops a column can fail an insert.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa

from toolkit.db import parse_url
from toolkit.milestones.m1_packages import NAME as M1
from toolkit.milestones.m4 import NAME as M4
from toolkit.mlflow_api import internal_ids
from toolkit.schema.gitlab import PACKAGE_TYPE_GENERIC, PACKAGE_TYPE_ML_MODEL

HAS_EXPERIMENT_ID = """
    SELECT count(*) = 1 FROM pg_attribute WHERE attrelid = 'ml_candidates'::regclass
      AND attname = 'experiment_id' AND NOT attisdropped"""
NEW_EXPERIMENT = """
    INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name)
    VALUES (now(), now(), :iid, :p, 'Live ' || :n || ' ' || gen_random_uuid()) RETURNING id"""
EXPERIMENT_PARENT = """
    SELECT e.id, e.iid, e.project_id, e.model_id FROM ml_experiments e
    ORDER BY e.id DESC LIMIT 1 OFFSET :k"""
MODEL_EXPERIMENT_PARENT = """
    SELECT e.id, e.iid, e.project_id, e.model_id FROM ml_experiments e
    WHERE e.model_id IS NOT NULL ORDER BY e.model_id DESC LIMIT 1 OFFSET :k"""
MODEL_PARENT = """
    SELECT NULL, m.id, m.project_id, m.id FROM ml_models m ORDER BY m.id DESC LIMIT 1 OFFSET :k"""


class AppWriter(threading.Thread):
    """Writes as GitLab does until ``finish()``; keeps the ids it wrote, each write's
    latency and every failure."""

    def __init__(self, url: sa.URL | str, *, package_type: int, experiments: bool,
                 interval_s: float = 0.01, experiment_every: int = 5):
        super().__init__(daemon=True)
        url = parse_url(url) if isinstance(url, str) else url
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        self.engine = sa.create_engine(url)
        self.package_type, self.experiments = package_type, experiments
        self.interval_s, self.experiment_every = interval_s, experiment_every
        self.stop_event = threading.Event()
        self.writing = threading.Event()  # set once the first write committed
        self.candidates: list[int] = []
        self.packages: list[int] = []
        self.new_experiments: list[int] = []
        self.latencies: list[tuple[float, float]] = []  # (finished at, seconds taken), perf_counter
        self.errors: list[str] = []  # each failure's first line
        self.error_kinds: list[str] = []  # each failure's class (psycopg's names the SQLSTATE class)

    @classmethod
    def during(cls, url: sa.URL | str, milestone: str, **kwargs: Any) -> AppWriter:
        """GitLab as deployed while ``milestone`` runs."""
        package_type = PACKAGE_TYPE_GENERIC if milestone == M1 else PACKAGE_TYPE_ML_MODEL
        return cls(url, package_type=package_type, experiments=milestone != M4, **kwargs)

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            n += 1
            started = time.perf_counter()
            try:
                with self.engine.begin() as conn:
                    self.write(conn, n)
                self.writing.set()
            except Exception as exc:  # counted, not fatal: the caller reports what happened
                orig = getattr(exc, "orig", None) or exc
                self.errors.append((str(orig).splitlines() or [""])[0])
                self.error_kinds.append(type(orig).__name__)
            finished = time.perf_counter()
            self.latencies.append((finished, finished - started))
            time.sleep(self.interval_s)

    def write(self, conn: sa.Connection, n: int) -> None:
        """One run logged, after a new experiment every ``experiment_every``-th time."""
        has_experiments = conn.execute(sa.text(HAS_EXPERIMENT_ID)).scalar()
        if self.experiments and self.experiment_every and n % self.experiment_every == 0:
            project = conn.execute(sa.text("SELECT min(id) FROM projects")).scalar_one()
            iid = internal_ids.next_experiment_iid(conn, project)
            self.new_experiments.append(
                conn.execute(sa.text(NEW_EXPERIMENT), {"n": n, "iid": iid, "p": project}).scalar_one())
        # the run's parent: one of the latest experiments, every other time one of a model
        parent = None
        if has_experiments and n % 2 == 0:
            parent = conn.execute(sa.text(MODEL_EXPERIMENT_PARENT), {"k": n % 7}).first()
        if parent is None:
            parent = conn.execute(sa.text(EXPERIMENT_PARENT if has_experiments else MODEL_PARENT),
                                  {"k": n % 7}).one()
        experiment_id, iid, project_id, model_id = parent
        candidate_iid = internal_ids.next_candidate_iid(conn, project_id)
        package = conn.execute(sa.text("""
            INSERT INTO packages_packages (created_at, updated_at, project_id, name, version, package_type)
            VALUES (now(), now(), :p, :name, :v, :t) RETURNING id"""),
            {"p": project_id, "name": f"ml_experiment_{iid}", "v": str(candidate_iid),
             "t": self.package_type}).scalar_one()
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
            {**parents, "p": project_id, "ci": candidate_iid, "pkg": package,
             "name": f"live-run-{n}"}).scalar_one()
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
        self.packages.append(package)
        self.candidates.append(candidate)

    def written_between(self, start: float, end: float) -> int:
        """How many writes finished between two ``time.perf_counter()`` readings."""
        return sum(1 for finished, _ in self.latencies if start < finished <= end)

    def finish(self, timeout_s: float = 30) -> dict[str, Any]:
        """Stop, and what the traffic saw: inserts, failures, latency percentiles."""
        self.stop_event.set()
        self.join(timeout_s)
        self.engine.dispose()
        taken = [took for _, took in self.latencies]
        return {"inserts": len(taken), "errors": len(self.errors),
                "error_kinds": sorted(set(self.error_kinds)),
                "p50_ms": as_ms(percentile(taken, 50)), "p99_ms": as_ms(percentile(taken, 99)),
                "max_ms": as_ms(max(taken, default=0))}


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def as_ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
