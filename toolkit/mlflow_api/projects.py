"""The project a request names, found as GitLab finds it (``lib/api/helpers.rb``).

``find_project``: an id matching ``INTEGER_ID_REGEX`` (``/^-?\\d+$/``, whose anchors are
Ruby's line anchors) is looked up by id, Rails casting it as it casts any integer; an id
with a ``/`` is a full path (``group/subgroup/project``, URL-encoded in the request), found
through the ``routes`` table (``Routable.find_by_full_path``: the exact path first, else
the path compared case-insensitively); anything else is no project. Projects pending
deletion or hidden are not found (``find_project_scopes``: ``without_deleted.not_hidden``),
when the database has those columns. Not found is ``404 Project Not Found``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.mlflow_api.errors import project_not_found
from toolkit.mlflow_api.rails import integer_cast, storable

INTEGER_ID = re.compile(r"^-?\d+$", re.ASCII | re.MULTILINE)


def _catalog(conn: Connection) -> tuple[bool, str]:
    """Whether ``routes`` exists, and GitLab's ``without_deleted.not_hidden`` on the
    columns this database has (one round trip)."""
    has_routes, pending_delete, hidden = conn.execute(sa.text("""
        SELECT to_regclass('routes') IS NOT NULL,
               EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('projects')
                       AND attname = 'pending_delete' AND NOT attisdropped),
               EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('projects')
                       AND attname = 'hidden' AND NOT attisdropped)""")).one()
    conditions = ["true"]
    if pending_delete:
        conditions.append("p.pending_delete IS NOT TRUE")
    if hidden:
        conditions.append("p.hidden IS NOT TRUE")
    return has_routes, " AND ".join(conditions)


def resolve_project(conn: Connection, segment: str) -> int:
    """The id of the project the URL's ``:id`` segment (still URL-encoded) names."""
    given = unquote(segment, errors="replace")
    if not storable(given):
        raise project_not_found()
    has_routes, visible = _catalog(conn)
    if INTEGER_ID.search(given):
        project_id = integer_cast(given)
        if project_id is None:
            raise project_not_found()
        found = conn.execute(sa.text(f"SELECT p.id FROM projects p WHERE p.id = :id AND {visible}"),
                             {"id": project_id}).scalar()
    elif "/" in given and has_routes:
        found = conn.execute(sa.text(f"""
            SELECT p.id FROM routes r JOIN projects p ON p.id = r.source_id
            WHERE r.source_type = 'Project' AND lower(r.path) = lower(:path) AND {visible}
            ORDER BY (r.path = :path) DESC, r.id LIMIT 1"""), {"path": given}).scalar()
    else:
        found = None
    if found is None:
        raise project_not_found()
    return int(found)
