"""A deterministic generator of GitLab-shaped ML data, fast enough for the x25 scale.

Same scale, profile and seed give the same rows, id for id (tests compare content
hashes). Speed comes from three choices:

* the tables are created bare and finished (indexes, foreign keys, triggers) after the
  load (:mod:`toolkit.sandbox.legacy_schema`);
* entity rows (projects, experiments, models, candidates, packages) are built in Python
  with explicit ids and streamed with COPY in bounded buffers, so memory stays flat
  (:mod:`toolkit.sandbox.rows`; what they are: :mod:`toolkit.sandbox.realistic` and
  :mod:`toolkit.sandbox.adversarial`);
* the bulk child rows (params, metrics, candidate metadata: 90% of the volume) are
  generated inside PostgreSQL with ``INSERT … SELECT`` over the loaded candidates, their
  values derived from ``hashint8extended(…, seed)`` so they are deterministic too.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.sandbox.adversarial import add_adversarial_rows
from toolkit.sandbox.legacy_schema import ALL_TABLES, create_tables, finish_schema
from toolkit.sandbox.realistic import build_realistic
from toolkit.sandbox.rows import Builder, CopySink
from toolkit.sandbox.scales import PROFILES, Scale
from toolkit.schema import gitlab


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
    entities = build_realistic(builder, scale)
    if profile == "adversarial":
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
