"""A run's ``artifact_uri`` by GitLab's rule, written once: as SQL for the fingerprint and
``plan``, composed with the server's external URL for the answers. Below the milestones,
the fingerprint and the MLflow API alike, since all three read it.

GitLab's rule (``lib/api/entities/ml/mlflow/run_info.rb`` @de09f039, ``RunInfo#artifact_uri``;
``app/models/ml/candidate.rb`` @15cc871f, ``app/models/ml/experiment.rb`` @0b12b085):

1. the candidate's package is ``generic`` (type 7): ``…/projects/<candidate's project>/
   packages/generic`` + ``artifact_root``, ``"/#{package_name}/#{package_version}/"``, where
   ``package_name`` is the experiment's (its model's name when the experiment is a model's
   default experiment, else ``ml_experiment_<experiment iid>``) and ``package_version`` the
   candidate's iid (``internal_id``); the package's own name and version play no part;
2. else, the candidate belongs to a model version: ``…/packages/ml_models/<model_version_id>/files/``;
3. else (an ``ml_model`` package, another type, or none): ``…/packages/ml_models/
   candidate:<iid>/files/``.

Every URI starts with GitLab's external URL (``expose_url``); here the SQL gives the path
and :func:`artifact_uri` puts the server's configured base in front, never a request's Host.

Milestone 1 turns generic packages into ``ml_model`` ones, so for every run it converts
GitLab's own answer goes from rule 1 to rule 2 or 3. That is a *declared* difference: the
fingerprint hashes the URI each run had before the toolkit's milestones (``canonical``: the
packages milestone 1's ledger converted read as their previous type, and the models
milestone 3 created read as absent), so verify proves every other URI unchanged and
rollback proves all of them back. Milestone 3 changes rule 1's ``package_name`` for
experiments it gives a model, which only matters for runs whose package is still generic.
After milestone 4 a candidate reaches its experiment through its model (``model_id``): the
``package_name`` of a blueprint-complete GitLab is then that model's name.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists, relation_exists
from toolkit.names import M1_LEDGER, M3_CREATED_MODELS
from toolkit.schema.gitlab import PACKAGE_TYPE_GENERIC

API = "/api/v4/projects/"


def artifact_uri(base_url: str, path: str | None) -> str:
    """The URI a client sees: the external URL, then the path :func:`path_sql` computed."""
    return f"{base_url.rstrip('/')}{path or ''}"


def path_sql(package_type: str, package_name: str, candidate: str = "c") -> str:
    """GitLab's three cases, from the package type expression, the experiment's package name
    expression and the candidate ``candidate``. ``concat`` writes a NULL as '' as Ruby's
    interpolation does."""
    c = candidate
    return (f"CASE WHEN {package_type} = {PACKAGE_TYPE_GENERIC} "
            f"THEN concat('{API}', {c}.project_id, '/packages/generic/', {package_name}, '/', "
            f"{c}.internal_id, '/') "
            f"WHEN {c}.model_version_id IS NOT NULL "
            f"THEN concat('{API}', {c}.project_id, '/packages/ml_models/', {c}.model_version_id, '/files/') "
            f"ELSE concat('{API}', {c}.project_id, '/packages/ml_models/candidate:', {c}.internal_id, "
            "'/files/') END")


def package_type_sql(conn: Connection, *, canonical: bool, package: str = "pk") -> str:
    """The package's type; ``canonical``: as it was before milestone 1 converted it."""
    if canonical and relation_exists(conn, M1_LEDGER):
        return (f"COALESCE((SELECT l.previous_package_type FROM {M1_LEDGER} l "
                f"WHERE l.package_id = {package}.id), {package}.package_type)")
    return f"{package}.package_type"


def package_name_sql(conn: Connection, experiments: str, *, canonical: bool, candidate: str = "c") -> str:
    """``Experiment#package_name`` of the candidate's experiment. ``experiments`` is where
    experiments are read at this stage (the table, milestone 4's archive, or the kept ids);
    ``canonical``: a model milestone 3 created counts as absent."""
    c = candidate
    created = canonical and relation_exists(conn, M3_CREATED_MODELS)
    model_name = (f"CASE WHEN am.id IN (SELECT model_id FROM {M3_CREATED_MODELS}) THEN NULL ELSE am.name END"
                  if created else "am.name")
    if column_exists(conn, "ml_candidates", "experiment_id"):
        return (f"(SELECT COALESCE({model_name}, 'ml_experiment_' || ae.iid) FROM {experiments} ae "
                f"LEFT JOIN ml_models am ON am.id = ae.model_id WHERE ae.id = {c}.experiment_id)")
    # blueprint-complete: the candidate's model stands for its experiment
    fallback = (f"(SELECT 'ml_experiment_' || ae.iid FROM {experiments} ae WHERE ae.model_id = am.id "
                "ORDER BY ae.id LIMIT 1)")
    return f"(SELECT COALESCE({model_name}, {fallback}) FROM ml_models am WHERE am.id = {c}.model_id)"


def artifact_path_sql(conn: Connection, experiments: str, *, canonical: bool = False,
                      candidate: str = "c", package: str = "pk") -> str:
    """The path of the run's ``artifact_uri`` for a candidate ``candidate`` LEFT JOINed to its
    package ``package``, at this stage (``canonical``: before the milestones' declared changes)."""
    return path_sql(package_type_sql(conn, canonical=canonical, package=package),
                    package_name_sql(conn, experiments, canonical=canonical, candidate=candidate),
                    candidate)
