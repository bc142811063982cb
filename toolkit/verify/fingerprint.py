"""A fingerprint of the ML data: what the tables hold and what an MLflow client sees.

Two halves:

- ``tables``: row count and content hash of every ML table (``digest.py``). Milestones
  change some tables on purpose (milestone 1 rewrites ``package_type``); the others must
  not change at all.
- ``mlflow``: GitLab's MLflow API as a client sees it (``reference/000`` and ``001``):
  experiments by ``iid`` and name with their tags, runs by ``eid`` with name, status,
  times, user and package, their params, the latest value of each metric, the full
  metric history and the run tags; each run's ``artifact_uri`` by GitLab's rule; and the
  registry as ``get_registered_model`` shows it (models, tags, versions, version tags).
  No milestone may change any of it but by its *declared* differences: milestone 1's
  converted packages change GitLab's ``artifact_uri`` of their runs, milestone 3 adds
  models and copies tags. Those parts are computed as before the declared changes (the
  ledgers say which rows), and :func:`declared_changes` records how many there are.

The MLflow half is computed the way the application will have to compute it at each
stage, so comparing it across a milestone proves the new structure still answers:

- before milestone 3: from ``ml_experiments`` (runs through ``experiment_id``);
- once models have ``display_name``: experiments through their model (the name is the
  display name of a model milestone 3 created, or the default experiment's own name for a
  model that already had one), and runs through ``ml_candidates.model_id``;
- after milestone 4: the same, with the ``iid`` mapping and experiment tags read from the
  archive (``toolkit.m4_archive_*``), as GitLab's MLflow endpoints will have to;
- after ``toolkit archive drop``: the same, from the ids milestone 4 kept for good
  (``toolkit.mlflow_experiment_ids``); experiment tags are then the models' metadata, the
  only copy left, and are not compared (:data:`NOT_COMPARABLE`).

Until then experiment tags are not read from ``ml_model_metadata``: a model may have
metadata its experiment never had, and metadata clashes keep the model's value.

Keyed parts (:data:`KEYED`) and tables (:data:`TABLE_KEYS`) also keep a digest per
bucket of ids, so a difference names the runs, experiments, models or packages it is in,
and verify can tell what MLflow clients wrote through the server since the baseline
(:mod:`toolkit.verify.app_writes`).

Every part is bounded by the ``id`` watermarks of the fingerprint it is compared with,
so rows the application inserts afterwards do not count as differences. Runs' params,
metrics and tags are keyed by the run's candidate id, which no milestone changes, rather
than by ``eid``: the ``runs`` part binds each id to its eid, and 10M metric rows are not
joined to their runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import column_exists, relation_exists
from toolkit.mlflow_api.artifact_uri import artifact_path_sql
from toolkit.names import (
    M1_LEDGER,
    M4_ARCHIVE_EXPERIMENTS,
    M4_ARCHIVE_METADATA,
    M4_ARCHIVES,
    M4_EXPERIMENT_IDS,
)
from toolkit.names import M3_COPIED_METADATA as COPIED_METADATA
from toolkit.names import M3_CREATED_MODELS as CREATED_MODELS
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.verify.digest import (
    METHOD,
    METHODS,
    Memo,
    bucketed_digest,
    query_digest,
    row_text,
    table_digest,
)
from toolkit.verify.named import excluded, recorded

FORMAT = METHOD  # the format is the digest method (verify/digest.py); 1 is still read

FROM_EXPERIMENTS = "experiments"
FROM_MODELS = "models"
FROM_MODELS_AND_ARCHIVE = "models + archive"
FROM_MODELS_AND_IDS = "models + kept experiment ids"  # after `toolkit archive drop`

# What a stage cannot compute as before: after the archive drop the experiments' own tags
# are gone; a blueprint-complete GitLab shows the model's metadata (milestone 3 copied them
# there; a clash kept the model's value). Declared, not compared.
NOT_COMPARABLE = {FROM_MODELS_AND_IDS: ("experiment_tags",)}


# The GitLab tables whose rows make each MLflow part (after milestone 4 the archive stands
# in for the two dropped tables). A part none of whose tables a milestone's runs wrote is
# unchanged by that milestone.
PART_TABLES: dict[str, tuple[str, ...]] = {
    "experiments": ("ml_experiments", "ml_models"),
    "experiment_tags": ("ml_experiment_metadata", "ml_experiments"),
    "runs": ("ml_candidates", "ml_experiments"),
    "run_params": ("ml_candidate_params",),
    "run_metrics_latest": ("ml_candidate_metrics",),
    "run_metrics_history": ("ml_candidate_metrics",),
    "run_tags": ("ml_candidate_metadata",),
    "run_artifact_uris": ("ml_candidates", "packages_packages", "ml_experiments", "ml_models"),
    # the registry as get_registered_model shows it (models milestone 3 created and the
    # metadata it copied left out: a declared difference, proven by its ledgers)
    "registered_models": ("ml_models",),
    "registered_model_tags": ("ml_model_metadata",),
    "model_versions": ("ml_model_versions", "ml_candidates"),
    "model_version_tags": ("ml_model_version_metadata",),
}
# Parts whose rows carry a key (``k``): their digest is also kept per bucket of keys, so a
# difference names the runs, models or experiments it is in, and ``verify`` can tell a
# difference confined to what MLflow clients wrote through the server since the baseline
# (toolkit/verify/app_writes.py). Not the metric parts: no milestone's baseline reads them
# (no milestone writes ml_candidate_metrics), and grouping 10M rows would slow every whole
# fingerprint. (the key's table, what a key names)
KEYED: dict[str, tuple[str, str]] = {
    "experiments": ("ml_experiments", "experiment"),
    "experiment_tags": ("ml_experiments", "experiment"),
    "runs": ("ml_candidates", "run"),
    "run_params": ("ml_candidates", "run"),
    "run_tags": ("ml_candidates", "run"),
    "run_artifact_uris": ("ml_candidates", "candidate"),
    "registered_models": ("ml_models", "model"),
    "registered_model_tags": ("ml_models", "model"),
    "model_versions": ("ml_model_versions", "model version"),
    "model_version_tags": ("ml_model_versions", "model version"),
}
# Tables whose digest is also kept per bucket of a key, so a difference in them names the
# runs, experiments or models it is in, as the keyed parts do (a rollback must give the
# tables back; what MLflow clients wrote since is theirs). (the key column, the key's table)
# ml_candidate_metrics is left out: no milestone changes it (a milestone's baseline never
# hashes it), and grouping 10M rows would slow every whole fingerprint.
TABLE_KEYS: dict[str, tuple[str, str]] = {
    "ml_experiments": ("id", "ml_experiments"),
    "ml_experiment_metadata": ("experiment_id", "ml_experiments"),
    "ml_candidates": ("id", "ml_candidates"),
    "ml_candidate_params": ("candidate_id", "ml_candidates"),
    "ml_candidate_metadata": ("candidate_id", "ml_candidates"),
    "ml_models": ("id", "ml_models"),
    "ml_model_metadata": ("model_id", "ml_models"),
    "ml_model_versions": ("id", "ml_model_versions"),
    "ml_model_version_metadata": ("model_version_id", "ml_model_versions"),
    "packages_packages": ("id", "packages_packages"),
}
KEY_NOUNS = {"ml_experiments": "experiment", "ml_candidates": "run", "ml_models": "model",
             "ml_model_versions": "model version", "packages_packages": "package"}
BUCKETS = 512  # at most about this many per part: one key a bucket up to 512 runs or models


@dataclass(frozen=True, kw_only=True)
class Scope:
    """What a milestone's baseline reads: only what the milestone can change.

    ``tables``: the tables it changes, hashed whole (a rollback must give them back
    exactly); ``kept``: for a table it changes only in part, the condition on the rows it
    may change (the other rows are hashed and must not change); ``parts``: the MLflow parts
    made from a table it changes; ``first_run``: its run that took the baseline. Every
    other table and part is proven untouched from the rows its runs wrote (engine/writes.py).
    ``named``: rows the milestone's blocking anomalies named when it started, left out of
    every digest and compared one by one (verify/named.py); ``named_parts``: the MLflow
    parts, each with the table whose named ids (its keys) it leaves out.
    """

    tables: tuple[str, ...]
    kept: dict[str, str]
    parts: tuple[str, ...]
    first_run: int
    named: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    named_parts: dict[str, str] = field(default_factory=dict)
    # For a part only some of whose rows the milestone can change: the condition (on the
    # part query's own aliases) on those rows. The others are made only from tables its
    # runs do not write, so they are proven untouched as the parts outside the scope are
    # (engine/writes.py), and hashing them would cost what the part costs whole.
    part_rows: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, changes: tuple[str, ...], may_change: dict[str, str], first_run: int,
           named: dict[str, dict[str, list[str]]] | None = None,
           named_parts: dict[str, str] | None = None,
           part_rows: dict[str, str] | None = None) -> Scope:
        parts = tuple(p for p, feeding in PART_TABLES.items() if set(feeding) & set(changes))
        rows = {p: where for p, where in (part_rows or {}).items() if p in parts}
        return cls(tables=tuple(changes), kept=dict(may_change), parts=parts, first_run=first_run,
                   named=dict(named or {}), named_parts=dict(named_parts or {}), part_rows=rows)


@dataclass
class Fingerprint:
    taken_at: str
    database: str
    source: str | None  # how the MLflow view was computed; None: it could not be
    watermarks: dict[str, int | None]
    tables: dict[str, dict[str, Any] | None]  # None: the table does not exist
    mlflow: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A milestone's baseline reads only its scope (None: everything, as `toolkit fingerprint`).
    scope: dict[str, Any] | None = None
    kept: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # rows it may not change
    format: int = FORMAT  # how its digests were computed
    # What the milestones changed on purpose when it was taken (their ledgers): runs whose
    # artifact_uri milestone 1 changed, models and tags milestone 3 added to the registry.
    declared: dict[str, int] = field(default_factory=dict)
    # The snapshot it was taken in (pg_current_snapshot): the writes MLflow clients made
    # through the server since are those of transactions it does not see (app_writes.py).
    snapshot: str | None = None
    # Rows made by the toolkit, or pointing at them, digested by natural key apart from
    # their table's other rows (NATURAL_KEYS); None: not taken that way (a baseline, or a
    # file written before this was), and compared as before.
    natural: dict[str, dict[str, Any]] | None = None
    # The rows its scope names (Scope.named) as they were: table -> id -> row (verify/named.py).
    named_rows: dict[str, dict[str, Any]] | None = None

    @property
    def scoped(self) -> Scope | None:
        return Scope(**self.scope) if self.scope is not None else None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def dumps(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> Fingerprint:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") not in METHODS:
            raise ValueError(f"not a toolkit fingerprint (format {' or '.join(map(str, METHODS))})")
        return cls(**data)


@dataclass(frozen=True)
class Difference:
    part: str  # "tables.ml_candidates", "mlflow.runs"
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    expected: bool  # a table the milestone changes on purpose
    note: str = ""
    where: str = ""  # the runs or models a keyed part differs in

    def describe(self) -> str:
        if self.note:
            return f"{self.part}: {self.note}"
        meaning = PART_MEANINGS.get(self.part.removeprefix("mlflow."))
        at = f"; differs at {self.where}" if self.where else ""
        if meaning:
            return f"{self.part} ({meaning}): {self._sides()}{at}"
        return f"{self.part}: {self._sides()}{at}"

    def _sides(self) -> str:

        def side(d: dict[str, Any] | None) -> str:
            return "absent" if d is None else f"{d['rows']} rows, hash {d['hash'][:12]}"
        return f"{side(self.before)} before, {side(self.after)} now"


# What a difference in these parts means to a user, said with it.
PART_MEANINGS = {
    "run_artifact_uris": "GitLab's artifact_uri of runs differs beyond what the milestones' ledgers "
                         "declare (milestone 1's converted packages), or a run's package is gone or "
                         "renamed",
    "registered_models": "get_registered_model shows an existing model changed (name, description, "
                         "user or times); milestone 3 only adds models",
    "registered_model_tags": "an existing model's tags changed beyond the metadata milestone 3 copied",
    "model_versions": "model versions changed",
    "model_version_tags": "model version tags changed",
}


# Rows whose ids come from sequences and may differ between two databases that hold the
# same data: models milestone 3's runs created (and what refers to them) get other ids on a
# database whose batch was rolled back after taking ids from the sequence (a crash, a full
# disk, a lock timeout), since sequences do not roll back. `toolkit fingerprint` digests
# these rows apart, by natural key (a model by project and name), and its --compare says
# which parts it compared that way. Each: which rows, and how they are compared.
NATURAL_KEYS: dict[str, str] = {
    "ml_models": "models milestone-3 created, by project and name, not id",
    "ml_model_metadata": "tags of the models milestone-3 created, by model (project and name) and "
                         "tag, not id",
    "ml_candidates": "runs in the models milestone-3 created, their model by project and name, "
                     "not model_id",
    "ml_experiments": "experiments of the models milestone-3 created, their model by project and "
                      "name, not model_id",
}
_MODEL_KEY = "jsonb_build_object('model', jsonb_build_array(m.project_id, m.name))"


def natural_rows(conn: Connection, table: str) -> tuple[str, str] | None:
    """For a table of :data:`NATURAL_KEYS` once milestone 3 has created models: the
    condition (on ``t``) picking the rows compared by natural key, and a query of their
    text ``r``; None otherwise. The table's own digest leaves those rows out."""
    if table not in NATURAL_KEYS or not relation_exists(conn, CREATED_MODELS) \
            or not relation_exists(conn, table):
        return None
    # only the migration's own models (a run made them): those MLflow clients made through
    # `mlflow serve` (run_id NULL) took their ids as the application's rows do, compared
    # by id up to the watermark like them
    created = f"(SELECT model_id FROM {CREATED_MODELS} WHERE run_id IS NOT NULL)"
    if table == "ml_models":
        condition = f"t.id IN {created}"
        return condition, f"SELECT (to_jsonb(t) - 'id')::text AS r FROM ml_models AS t WHERE {condition}"
    if not column_exists(conn, table, "model_id"):
        return None
    condition = f"t.model_id IN {created}"
    # a model's tags have ids of their own from the sequence; runs and experiments keep theirs
    # (bounded by the watermark as every other row)
    own_id, bound = ("- 'id' ", "") if table == "ml_model_metadata" else ("", " AND t.id <= :w")
    return condition, (f"SELECT (to_jsonb(t) {own_id}- 'model_id' || {_MODEL_KEY})::text AS r "
                       f"FROM {table} AS t JOIN ml_models m ON m.id = t.model_id "
                       f"WHERE {condition}{bound}")


def mlflow_source(conn: Connection) -> str | None:
    if relation_exists(conn, "ml_experiments"):
        return FROM_MODELS if column_exists(conn, "ml_models", "display_name") else FROM_EXPERIMENTS
    if relation_exists(conn, M4_ARCHIVE_EXPERIMENTS):
        return FROM_MODELS_AND_ARCHIVE
    # after `toolkit archive drop`: the ids milestone 4 kept
    return FROM_MODELS_AND_IDS if relation_exists(conn, M4_EXPERIMENT_IDS) else None


def experiment_relations(source: str) -> tuple[str, str]:
    """Where experiments and their tags are read: the live tables, the archive, or after the
    archive drop the kept ids with their models' metadata as tags (``experiment_id``,
    ``id``, ``name``, ``value``)."""
    if source == FROM_MODELS_AND_ARCHIVE:
        return M4_ARCHIVE_EXPERIMENTS, M4_ARCHIVE_METADATA
    if source == FROM_MODELS_AND_IDS:
        return M4_EXPERIMENT_IDS, (f"(SELECT k.id AS experiment_id, mm.id, mm.name, mm.value "
                                   f"FROM {M4_EXPERIMENT_IDS} k JOIN ml_model_metadata mm "
                                   "ON mm.model_id = k.model_id)")
    return "ml_experiments", "ml_experiment_metadata"


def experiments_view(conn: Connection, source: str, where: str = "true") -> str:
    """The experiments as an MLflow client sees them at this stage, one row each: ``id``
    (of the experiment row), ``project_id``, ``iid``, ``name``, ``deleted_on``,
    ``created_at``, ``model_id``. ``where`` filters the experiment rows (alias ``x``)."""
    experiments, _ = experiment_relations(source)
    if source == FROM_EXPERIMENTS:
        return f"""
            SELECT x.id, x.project_id, x.iid, x.name, x.deleted_on, x.created_at, x.model_id
            FROM ml_experiments x WHERE {where}"""
    created = (f"SELECT model_id FROM {CREATED_MODELS}" if relation_exists(conn, CREATED_MODELS)
               else "SELECT NULL::bigint AS model_id WHERE false")
    return f"""
        SELECT x.id, COALESCE(m.project_id, x.project_id) AS project_id, x.iid,
               CASE WHEN cm.model_id IS NOT NULL THEN m.display_name ELSE x.name END AS name,
               x.deleted_on, x.created_at, x.model_id
        FROM {experiments} x LEFT JOIN ml_models m ON m.id = x.model_id
        LEFT JOIN ({created}) cm ON cm.model_id = x.model_id
        WHERE {where}"""


def run_parent(conn: Connection, source: str) -> str:
    """The join that gives a candidate ``c`` its experiment ``x`` (``project_id``, ``iid``)."""
    experiments, _ = experiment_relations(source)
    if source == FROM_EXPERIMENTS:
        return "LEFT JOIN ml_experiments x ON x.id = c.experiment_id"
    # a candidate reaches its experiment through its model; one the backfill has not
    # reached yet (milestone 3 in progress) still through experiment_id
    if column_exists(conn, "ml_candidates", "experiment_id"):
        return f"""LEFT JOIN {experiments} xm ON xm.model_id = c.model_id
            LEFT JOIN {experiments} xe ON xe.id = c.experiment_id AND c.model_id IS NULL
            CROSS JOIN LATERAL (SELECT COALESCE(xm.project_id, xe.project_id) AS project_id,
                                       COALESCE(xm.iid, xe.iid) AS iid) x"""
    return f"LEFT JOIN {experiments} x ON x.model_id = c.model_id"


def runs_of_experiment(conn: Connection, source: str) -> str:
    """The condition on a candidate ``c`` that :func:`run_parent` maps to the experiment
    whose row id is ``:experiment_row`` and whose model is ``:experiment_model``, written
    so an index answers it (``experiment_id``, ``model_id``)."""
    if source == FROM_EXPERIMENTS:
        return "c.experiment_id = :experiment_row"
    if column_exists(conn, "ml_candidates", "experiment_id"):
        return ("(c.model_id = :experiment_model OR "
                "(c.model_id IS NULL AND c.experiment_id = :experiment_row))")
    return "c.model_id = :experiment_model"


def _mlflow_parts(conn: Connection, source: str) -> dict[str, str]:
    """The SQL of each part: one text column ``r`` per row an MLflow client would see."""
    experiments, tags = experiment_relations(source)
    experiment_rows = f"""
        SELECT ROW(e.project_id, e.iid, e.name, e.deleted_on IS NOT NULL)::text AS r, e.id AS k
        FROM ({experiments_view(conn, source, "x.id <= :w_experiments")}) e"""
    parent = run_parent(conn, source)
    created = relation_exists(conn, CREATED_MODELS)
    not_created = f"NOT IN (SELECT model_id FROM {CREATED_MODELS})" if created else "IS NOT NULL"
    not_copied = (f"mm.id NOT IN (SELECT model_metadata_id FROM {COPIED_METADATA})"
                  if relation_exists(conn, COPIED_METADATA) else "true")
    uri = artifact_path_sql(conn, experiments, canonical=True)
    parts = {
        "experiments": experiment_rows,
        "experiment_tags": f"""
            SELECT ROW(x.project_id, x.iid, t.name, t.value)::text AS r, x.id AS k
            FROM {tags} t JOIN {experiments} x ON x.id = t.experiment_id
            WHERE t.id <= :w_experiment_metadata""",
        "runs": f"""
            SELECT ROW(c.id, c.eid, x.project_id, x.iid, c.name, c.status, c.start_time,
                       c.end_time, c.user_id, c.package_id, c.internal_id)::text AS r, c.id AS k
            FROM ml_candidates c {parent} WHERE c.id <= :w_candidates""",
        "run_params": """
            SELECT ROW(p.candidate_id, p.name, p.value)::text AS r, p.candidate_id AS k
            FROM ml_candidate_params p WHERE p.id <= :w_params""",
        "run_metrics_latest": """
            SELECT DISTINCT ON (x.candidate_id, x.name)
                   ROW(x.candidate_id, x.name, x.value, x.step, x.tracked_at, x.is_nan)::text AS r
            FROM ml_candidate_metrics x WHERE x.id <= :w_metrics
            ORDER BY x.candidate_id, x.name, x.id DESC""",
        "run_metrics_history": """
            SELECT ROW(x.candidate_id, x.name, x.value, x.step, x.tracked_at, x.is_nan)::text AS r
            FROM ml_candidate_metrics x WHERE x.id <= :w_metrics""",
        "run_tags": """
            SELECT ROW(t.candidate_id, t.name, t.value)::text AS r, t.candidate_id AS k
            FROM ml_candidate_metadata t WHERE t.id <= :w_candidate_metadata""",
        "run_artifact_uris": f"""
            SELECT ROW(c.id, {uri}, pk.id, pk.project_id, pk.name, pk.version)::text AS r, c.id AS k
            FROM ml_candidates c LEFT JOIN packages_packages pk ON pk.id = c.package_id
            WHERE c.id <= :w_candidates""",
        "registered_models": f"""
            SELECT ROW(m.id, m.project_id, m.name, m.description, m.user_id, m.created_at,
                       m.updated_at)::text AS r, m.id AS k
            FROM ml_models m WHERE m.id <= :w_models AND m.id {not_created}""",
        "registered_model_tags": f"""
            SELECT ROW(mm.model_id, mm.name, mm.value)::text AS r, mm.model_id AS k
            FROM ml_model_metadata mm WHERE mm.id <= :w_model_metadata AND {not_copied}
              AND mm.model_id {not_created}""",
        "model_versions": """
            SELECT ROW(v.id, v.model_id, v.version, v.description, v.created_at, v.updated_at,
                       c.eid)::text AS r, v.id AS k
            FROM ml_model_versions v LEFT JOIN ml_candidates c ON c.model_version_id = v.id
            WHERE v.id <= :w_model_versions""",
        "model_version_tags": """
            SELECT ROW(t.model_version_id, t.name, t.value)::text AS r, t.model_version_id AS k
            FROM ml_model_version_metadata t WHERE t.id <= :w_model_version_metadata""",
    }
    for part in NOT_COMPARABLE.get(source, ()):
        del parts[part]
    return parts


def declared_changes(conn: Connection, marks: dict[str, int | None]) -> dict[str, int]:
    """What the milestones' ledgers say they changed on purpose in what users see, within the
    watermarks: runs whose artifact_uri milestone 1 changed (their package converted), models
    milestone 3 created and metadata it copied to models."""
    found: dict[str, int] = {}
    if relation_exists(conn, M1_LEDGER):
        found["runs whose artifact_uri milestone-1 changed"] = conn.execute(sa.text(f"""
            SELECT count(*) FROM ml_candidates c JOIN {M1_LEDGER} l ON l.package_id = c.package_id
            WHERE c.id <= :w"""), {"w": _bound(marks, "ml_candidates")}).scalar_one()
    if relation_exists(conn, CREATED_MODELS):
        found["models milestone-3 created"] = conn.execute(sa.text(
            f"SELECT count(*) FROM {CREATED_MODELS}")).scalar_one()
    if relation_exists(conn, COPIED_METADATA):
        found["model tags milestone-3 copied"] = conn.execute(sa.text(
            f"SELECT count(*) FROM {COPIED_METADATA}")).scalar_one()
    return {k: n for k, n in found.items() if n}


_WATERMARK_PARAMS = {
    "w_experiments": "ml_experiments",
    "w_experiment_metadata": "ml_experiment_metadata",
    "w_candidates": "ml_candidates",
    "w_params": "ml_candidate_params",
    "w_metrics": "ml_candidate_metrics",
    "w_candidate_metadata": "ml_candidate_metadata",
    "w_models": "ml_models",
    "w_model_metadata": "ml_model_metadata",
    "w_model_versions": "ml_model_versions",
    "w_model_version_metadata": "ml_model_version_metadata",
}
_NO_BOUND = 2**63 - 1


def _bound(marks: dict[str, int | None], table: str) -> int:
    mark = marks.get(table)
    return _NO_BOUND if mark is None else mark


def _watermarks(conn: Connection) -> dict[str, int | None]:
    """The highest id of every ML table (the archive stands in for dropped tables)."""
    marks: dict[str, int | None] = {}
    archived = M4_ARCHIVES
    for table in ML_TABLE_NAMES:
        relation = table if relation_exists(conn, table) else archived.get(table)
        if table == "ml_experiments" and not (relation and relation_exists(conn, relation)):
            relation = M4_EXPERIMENT_IDS  # after the archive drop, the ids it kept
        if relation and relation_exists(conn, relation):
            marks[table] = conn.execute(sa.text(f"SELECT COALESCE(max(id), 0) FROM {relation}")).scalar_one()
        else:
            marks[table] = None
    return marks


# MLflow parts that are a function of one table's rows alone: where that table's digest
# equals the reference's (same watermark), the part is equal too and is not recomputed.
# That spares verify two of its three passes over the 10M metric rows at x25.
DERIVED_FROM = {
    "run_params": "ml_candidate_params",
    "run_metrics_latest": "ml_candidate_metrics",
    "run_metrics_history": "ml_candidate_metrics",
    "run_tags": "ml_candidate_metadata",
}


def take(conn: Connection, watermarks: dict[str, int | None] | None = None,
         memo: Memo | None = None, reference: Fingerprint | None = None,
         scope: Scope | None = None, natural: bool = False) -> Fingerprint:
    """Fingerprint the database as ``conn`` sees it (call it in one REPEATABLE READ
    transaction so both halves see the same instant). With ``reference`` (and its
    watermarks), digests are computed its way and parts :data:`DERIVED_FROM` an unchanged
    table are taken from it. With ``scope``, only the tables, rows and parts it names are
    read. ``natural``: the rows of :data:`NATURAL_KEYS` are digested apart, by natural
    key (``toolkit fingerprint``; a milestone's baseline compares ids, as it always did)."""
    # Sorting the latest metric per run happens in the server: give it room for that one
    # query instead of spilling 10M rows to disk (it is not the toolkit's memory).
    conn.execute(sa.text("SET LOCAL work_mem = '256MB'"))
    marks = watermarks if watermarks is not None else _watermarks(conn)
    method = reference.format if reference is not None else FORMAT

    def bound(table: str) -> int:
        mark = marks.get(table)
        return _NO_BOUND if mark is None else mark

    def digest_of(table: str, where: str = "") -> dict[str, Any] | None:
        if not relation_exists(conn, table):
            return None
        if table in TABLE_KEYS and method == METHOD:
            key, keys_of = TABLE_KEYS[table]
            theirs = (reference.tables.get(table) if reference is not None and not where else None) or {}
            size = theirs.get("bucket_size") or max(1, -(-(_bound_or_zero(marks, keys_of) + 1) // BUCKETS))
            sql = (f"SELECT {row_text(conn, table)} AS r, t.{key} AS k FROM {table} AS t "
                   f"WHERE t.id <= :w{where}")
            rows, digest, buckets = bucketed_digest(conn, sql, {"w": bound(table)}, size, method, memo)
            return {"rows": rows, "hash": digest, "bucket_size": size, "buckets": buckets}
        whole = table_digest(conn, table, f"t.id <= :w{where}", {"w": bound(table)}, memo, method)
        return {"rows": whole.rows, "hash": whole.digest}

    named = scope.named if scope else {}
    tables: dict[str, dict[str, Any] | None] = {}
    by_natural_key: dict[str, dict[str, Any]] = {}
    for table in (scope.tables if scope else ML_TABLE_NAMES):
        picked = natural_rows(conn, table) if natural else None
        if picked is None:
            tables[table] = digest_of(table, excluded(named.get(table)))
            continue
        condition, sql = picked
        tables[table] = digest_of(table, f" AND NOT COALESCE({condition}, false)")
        rows, digest = query_digest(conn, sql, {"w": bound(table)}, memo, method)
        if rows:  # none (a ledger emptied by a rollback): the table's digest holds every row
            by_natural_key[table] = {"rows": rows, "hash": digest}
    kept = {table: digest_of(table, f" AND NOT ({rows}){excluded(named.get(table))}")
            for table, rows in (scope.kept if scope else {}).items()}
    source = mlflow_source(conn)
    mlflow: dict[str, dict[str, Any]] = {}
    if source is not None:
        params = {param: bound(table) for param, table in _WATERMARK_PARAMS.items()}
        comparable = reference is not None and reference.watermarks == marks
        for part, sql in _mlflow_parts(conn, source).items():
            if scope is not None and part not in scope.parts:
                continue
            if scope is not None and part in scope.part_rows:
                # the part's query ends with its WHERE clause (run_artifact_uris does)
                assert "WHERE" in sql.rstrip().rsplit("\n", 1)[-1], part
                sql = f"{sql} AND ({scope.part_rows[part]})"
            derived_from = DERIVED_FROM.get(part)
            if (reference is not None and comparable and derived_from
                    and tables.get(derived_from) is not None
                    and _same(reference.tables.get(derived_from), tables[derived_from])
                    and part in reference.mlflow):
                mlflow[part] = reference.mlflow[part]
                continue
            if named_keys := named.get((scope.named_parts if scope else {}).get(part, "")):
                sql = f"SELECT q.r, q.k FROM ({sql}) AS q WHERE true{excluded(named_keys, 'q.k')}"
            if part in KEYED:
                mlflow[part] = _keyed_digest(conn, sql, params, part, marks, reference, method, memo)
                continue
            rows, digest = query_digest(conn, sql, params, memo, method)
            mlflow[part] = {"rows": rows, "hash": digest}
    database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
    declared = declared_changes(conn, marks) if source is not None else {}
    snapshot = conn.execute(sa.text("SELECT pg_current_snapshot()::text")).scalar_one()
    return Fingerprint(datetime.now(UTC).isoformat(timespec="seconds"), database, source, marks,
                       tables, mlflow, scope.__dict__ if scope else None, kept, method, declared, snapshot,
                       natural=by_natural_key if natural else None,
                       named_rows=recorded(conn, named) if named else None)


def _keyed_digest(conn: Connection, sql: str, params: dict[str, Any], part: str,
                  marks: dict[str, int | None], reference: Fingerprint | None, method: int,
                  memo: Memo | None) -> dict[str, Any]:
    """A keyed part's digest with its buckets, of the reference's size when it has one."""
    theirs = reference.mlflow.get(part) if reference is not None else None
    keys = _bound_or_zero(marks, KEYED[part][0]) + 1
    size = (theirs or {}).get("bucket_size") or max(1, -(-keys // BUCKETS))
    rows, digest, buckets = bucketed_digest(conn, sql, params, size, method, memo)
    found: dict[str, Any] = {"rows": rows, "hash": digest}
    if buckets or method == METHOD:
        found.update(bucket_size=size, buckets=buckets)
    return found


def _bound_or_zero(marks: dict[str, int | None], table: str) -> int:
    return marks.get(table) or 0


def _same(one: dict[str, Any] | None, other: dict[str, Any] | None) -> bool:
    """Equal digests (buckets only locate a difference; a fingerprint may have none)."""
    if one is None or other is None:
        return one is other
    return (one["rows"], one["hash"]) == (other["rows"], other["hash"])


def differing_buckets(one: dict[str, Any] | None,
                      other: dict[str, Any] | None) -> tuple[int, list[int]] | None:
    """The bucket size and the buckets two keyed digests differ in; None when they cannot
    say (a side without buckets, or buckets of different sizes)."""
    if not one or not other or one.get("bucket_size") != other.get("bucket_size") \
            or "buckets" not in one or "buckets" not in other:
        return None
    a, b = one["buckets"], other["buckets"]
    return one["bucket_size"], sorted(int(k) for k in set(a) | set(b) if a.get(k) != b.get(k))


def locate(part: str, one: dict[str, Any] | None, other: dict[str, Any] | None) -> str:
    """Where two keyed digests differ: the keys (one a bucket) or key ranges, at most ten."""
    found = differing_buckets(one, other) if part in KEYED or part in TABLE_KEYS else None
    if not found or not found[1]:
        return ""
    size, differ = found
    noun = KEYED[part][1] if part in KEYED else KEY_NOUNS[TABLE_KEYS[part][1]]
    shown = [str(k) if size == 1 else f"{k * size}-{k * size + size - 1}" for k in differ[:10]]
    more = f" and {len(differ) - 10} more" if len(differ) > 10 else ""
    return f"{noun}{'s' if len(differ) > 1 or size > 1 else ''} {'id ' if size == 1 else 'ids '}" \
        f"{', '.join(shown)}{more}"


def compare(before: Fingerprint, after: Fingerprint, *, changes: tuple[str, ...] = (),
            tables: bool = True) -> list[Difference]:
    """What differs. ``changes`` are tables changed on purpose (reported, expected);
    ``tables=False`` compares the MLflow view only (later milestones changed the tables)."""
    if before.format != after.format:
        return [Difference("format", None, None, False, note=(
            f"hashed two ways (formats {before.format} and {after.format}): take one again"))]
    found: list[Difference] = []
    scoped = before.scope is not None or after.scope is not None

    def keys(one: dict[str, Any], other: dict[str, Any]) -> list[str]:
        """What both read (a scoped fingerprint reads only part); else what either has."""
        return sorted(set(one) & set(other) if scoped else set(one) | set(other))

    if tables:
        for table in keys(before.tables, after.tables):
            b, a = before.tables.get(table), after.tables.get(table)
            if not _same(b, a):
                found.append(Difference(f"tables.{table}", b, a, table in changes,
                                        where=locate(table, b, a)))
        for table in keys(before.kept, after.kept):
            b, a = before.kept.get(table), after.kept.get(table)
            if not _same(b, a):
                found.append(Difference(f"tables.{table} (rows it may not change)", b, a, False))
        # rows made by the toolkit since ``before`` was taken are rows added since: only what
        # it had is compared (and must still be there)
        for table in sorted(before.natural or {}):
            b, a = (before.natural or {}).get(table), (after.natural or {}).get(table)
            if not _same(b, a):
                found.append(Difference(f"tables.{table} ({NATURAL_KEYS.get(table, 'by natural key')})",
                                        b, a, table in changes))
    if after.source is None and before.source is not None:
        found.append(Difference("mlflow", None, None, False, note=(
            "the MLflow view cannot be computed any more: ml_experiments and its archive are gone")))
        return found
    skipped = {p for fp in (before, after) for p in NOT_COMPARABLE.get(fp.source or "", ())}
    for part in keys(before.mlflow, after.mlflow):
        if part in skipped:
            continue
        b, a = before.mlflow.get(part), after.mlflow.get(part)
        if not _same(b, a):
            found.append(Difference(f"mlflow.{part}", b, a, False, where=locate(part, b, a)))
    return found
