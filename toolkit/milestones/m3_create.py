"""Milestone 3's forward batch: models created for a batch of experiments without one,
named by slugs computed against the names taken in their projects, with the ledgers
rollback reads, the clashes recorded and the metadata copied; and the slugs a plan
foresees, computed exactly as the batch does. (Also the batch body the MLflow server's
``experiments/create`` runs on a database where milestone 3 is under way.)"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine.listing import STREAMED, read_to_the_end
from toolkit.milestones import slug
from toolkit.names import M3_COPIED_METADATA as COPIED
from toolkit.names import M3_CREATED_MODELS as CREATED
from toolkit.names import M3_METADATA_CLASHES as CLASHES

LOCK_EXPERIMENTS = """
SELECT id, project_id, iid, name FROM ml_experiments
WHERE id > :lo AND id <= :hi AND model_id IS NULL
ORDER BY id FOR UPDATE"""

TAKEN_NAMES = "SELECT project_id, name FROM ml_models WHERE project_id = ANY(:projects)"

CREATE_MODELS = f"""
WITH input AS (
    SELECT * FROM unnest(CAST(:experiment_ids AS bigint[]), CAST(:project_ids AS bigint[]),
                         CAST(:slugs AS text[])) AS t(experiment_id, project_id, slug)
), created AS (
    INSERT INTO ml_models (created_at, updated_at, project_id, name, user_id, display_name)
    SELECT e.created_at, e.updated_at, e.project_id, i.slug, e.user_id, e.name
    FROM input i JOIN ml_experiments e ON e.id = i.experiment_id
    RETURNING id, project_id, name
), linked AS (
    -- each new model is matched to its experiment by (project, slug), never through
    -- the project's other experiments: a project can have thousands
    UPDATE ml_experiments e SET model_id = c.id
    FROM input i JOIN created c ON c.project_id = i.project_id AND c.name = i.slug
    WHERE e.id = i.experiment_id
    RETURNING e.id AS experiment_id, c.id AS model_id, e.project_id
), ledger AS (
    INSERT INTO {CREATED} (model_id, experiment_id, project_id, run_id)
    SELECT model_id, experiment_id, project_id, :run_id FROM linked
)
SELECT count(*) FROM linked"""

RECORD_CLASHES = f"""
INSERT INTO {CLASHES} (experiment_id, name, model_id, experiment_value, model_value, run_id)
SELECT e.id, em.name, e.model_id, em.value, mm.value, :run_id
FROM ml_experiments e
JOIN ml_experiment_metadata em ON em.experiment_id = e.id
JOIN ml_model_metadata mm ON mm.model_id = e.model_id AND mm.name = em.name
WHERE e.id > :lo AND e.id <= :hi AND mm.value <> em.value
ON CONFLICT (experiment_id, name) DO NOTHING"""

COPY_METADATA = f"""
WITH copied AS (
    INSERT INTO ml_model_metadata (created_at, updated_at, model_id, name, value, project_id)
    SELECT em.created_at, em.updated_at, e.model_id, em.name, em.value, em.project_id
    FROM ml_experiments e JOIN ml_experiment_metadata em ON em.experiment_id = e.id
    WHERE e.id > :lo AND e.id <= :hi AND e.model_id IS NOT NULL
    ON CONFLICT (model_id, name) DO NOTHING
    RETURNING id, model_id
)
INSERT INTO {COPIED} (model_metadata_id, model_id, run_id) SELECT id, model_id, :run_id FROM copied"""


def create_models_batch(conn: Connection, lo: int, hi: int, run_id: int | None) -> int:
    """The batch body: the statements of :data:`CREATE_MODELS` and friends, slugs bound."""
    bounds = {"lo": lo, "hi": hi, "run_id": run_id}
    experiments = conn.execute(sa.text(LOCK_EXPERIMENTS), bounds).all()
    created = 0
    if experiments:
        taken: dict[int, set[str]] = {}
        projects = sorted({e.project_id for e in experiments})
        for project_id, name in conn.execute(sa.text(TAKEN_NAMES), {"projects": projects}):
            taken.setdefault(project_id, set()).add(name)
        slugs = slug.assign_all([(e.id, e.project_id, e.iid, e.name) for e in experiments], taken)
        ids = sorted(slugs)
        project_of = {e.id: e.project_id for e in experiments}
        created = conn.execute(sa.text(CREATE_MODELS), {
            "experiment_ids": ids, "project_ids": [project_of[i] for i in ids],
            "slugs": [slugs[i][0] for i in ids], "run_id": run_id,
        }).scalar_one()
    conn.execute(sa.text(RECORD_CLASHES), bounds)
    conn.execute(sa.text(COPY_METADATA), bounds)
    return created


def planned_slugs(conn: Connection) -> Iterator[PlannedSlug]:
    """The slug every experiment without a model would get, exactly as apply computes it.

    Streamed one project at a time (experiments and model names both ordered by project),
    so only one project's names are ever in memory, however many projects there are.
    """
    read_to_the_end(conn)
    models = groupby(conn.execute(sa.text(
        "SELECT project_id, name FROM ml_models ORDER BY project_id"), execution_options=STREAMED),
        key=lambda r: r.project_id)
    experiments = groupby(conn.execute(sa.text(
        "SELECT id, project_id, iid, name FROM ml_experiments WHERE model_id IS NULL "
        "ORDER BY project_id, id"), execution_options=STREAMED), key=lambda r: r.project_id)
    names_project, names = next(models, (None, iter(())))
    for project_id, rows in experiments:
        while names_project is not None and names_project < project_id:
            names_project, names = next(models, (None, iter(())))
        taken = {r.name for r in names} if names_project == project_id else set()
        for e in rows:
            chosen, base, fell_back = slug.assign(e.name, e.iid, taken)
            yield PlannedSlug(e.id, project_id, e.name, chosen, base, fell_back)


@dataclass(frozen=True)
class PlannedSlug:
    experiment_id: int
    project_id: int
    name: str
    slug: str
    wanted: str  # the slug before a suffix (or the fallback)
    fell_back: bool
