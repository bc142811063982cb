"""Per-project iids from GitLab's ``internal_ids`` table, allocated as GitLab allocates them.

An experiment's ``iid`` (the MLflow ``experiment_id``) and a candidate's ``internal_id``
are ``has_internal_id`` columns (``app/models/ml/experiment.rb``, ``candidate.rb``): GitLab
takes the next value from the ``internal_ids`` row of (project, usage), ``usage`` being the
model's table in ``Enums::InternalId.usage_resources`` (``ml_experiments: 12``,
``ml_candidates: 13``). The server must use the same row, never ``max(iid) + 1``: a live
GitLab creating an experiment in the same project at the same moment would otherwise
hand out the same iid.

GitLab's statements (``InternalId::ImplicitlyLockingInternalIdGenerator#generate``,
``app/models/internal_id.rb``): ``UPDATE internal_ids SET last_value = last_value + 1
WHERE project_id = … AND usage = … RETURNING last_value``; when no row matched, insert one
whose ``last_value`` is the ``init`` (``AtomicInternalId.project_init``: the greatest
existing iid of the project) plus one, and on a unique violation (another session
inserted it first) start again with the UPDATE. Here the insert is ``ON CONFLICT DO
NOTHING`` (the same outcome without aborting the transaction). The UPDATE's row lock is
held until the write commits, so a concurrent allocator, GitLab's or ours, waits and then
takes the next value: iids are unique and, as on GitLab, gapless except for rollbacks.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# Enums::InternalId.usage_resources (app/models/concerns/enums/internal_id.rb)
ML_EXPERIMENTS = 12
ML_CANDIDATES = 13

# AtomicInternalId.project_init(klass, column): the greatest value of the project's rows
EXPERIMENTS_INIT = "SELECT max(iid) FROM ml_experiments WHERE project_id = :project"
CANDIDATES_INIT = "SELECT max(internal_id) FROM ml_candidates WHERE project_id = :project"


def next_iid(conn: Connection, usage: int, project_id: int, init_sql: str) -> int:
    """The next value of (project, usage), in the caller's transaction. ``init_sql``
    answers the greatest existing value of the project (bound ``:project``); it is read only
    when the counter row does not exist yet."""
    for _ in range(100):
        value = conn.execute(sa.text("""
            UPDATE internal_ids SET last_value = last_value + 1
            WHERE project_id = :project AND usage = :usage RETURNING last_value"""),
            {"project": project_id, "usage": usage}).scalar_one_or_none()
        if value is not None:
            return int(value)
        value = conn.execute(sa.text(f"""
            INSERT INTO internal_ids (project_id, usage, last_value)
            SELECT :project, :usage, COALESCE(({init_sql}), 0) + 1
            ON CONFLICT DO NOTHING RETURNING last_value"""),
            {"project": project_id, "usage": usage}).scalar_one_or_none()
        if value is not None:
            return int(value)
    raise RuntimeError(f"internal_ids of project {project_id}, usage {usage}: no row could be taken")


def next_experiment_iid(conn: Connection, project_id: int, init_sql: str = EXPERIMENTS_INIT) -> int:
    return next_iid(conn, ML_EXPERIMENTS, project_id, init_sql)


def next_candidate_iid(conn: Connection, project_id: int) -> int:
    return next_iid(conn, ML_CANDIDATES, project_id, CANDIDATES_INIT)
