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
stage (:mod:`toolkit.verify.mlflow_view`), so comparing it across a milestone proves the
new structure still answers; its parts are :mod:`toolkit.verify.mlflow_parts`, and what
differs between two fingerprints :mod:`toolkit.verify.differences`. After ``toolkit
archive drop`` experiment tags are the models' metadata, the only copy left, and are not
compared (:data:`~toolkit.verify.mlflow_parts.NOT_COMPARABLE`).

Until then experiment tags are not read from ``ml_model_metadata``: a model may have
metadata its experiment never had, and metadata clashes keep the model's value.

Keyed parts (:data:`~toolkit.verify.mlflow_parts.KEYED`) and tables (:data:`TABLE_KEYS`)
also keep a digest per bucket of ids, so a difference names the runs, experiments, models
or packages it is in, and verify can tell what MLflow clients wrote through the server
since the baseline (:mod:`toolkit.verify.app_writes`).

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

from toolkit.catalog import relation_exists
from toolkit.names import (
    M1_LEDGER,
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
from toolkit.verify.mlflow_parts import DERIVED_FROM, KEYED, PART_TABLES, WATERMARK_PARAMS, mlflow_parts
from toolkit.verify.mlflow_view import mlflow_source
from toolkit.verify.named import excluded, recorded
from toolkit.verify.natural_keys import natural_rows

FORMAT = METHOD  # the format is the digest method (verify/digest.py); 1 is still read


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


def take(conn: Connection, watermarks: dict[str, int | None] | None = None,
         memo: Memo | None = None, reference: Fingerprint | None = None,
         scope: Scope | None = None, natural: bool = False) -> Fingerprint:
    """Fingerprint the database as ``conn`` sees it (call it in one REPEATABLE READ
    transaction so both halves see the same instant). With ``reference`` (and its
    watermarks), digests are computed its way and parts derived from an unchanged table
    (:data:`~toolkit.verify.mlflow_parts.DERIVED_FROM`) are taken from it. With ``scope``,
    only the tables, rows and parts it names are read. ``natural``: the rows of
    :data:`~toolkit.verify.natural_keys.NATURAL_KEYS` are digested apart, by natural key
    (``toolkit fingerprint``; a milestone's baseline compares ids, as it always did)."""
    # Sorting the latest metric per run happens in the server: give it room for that one
    # query instead of spilling 10M rows to disk (it is not the toolkit's memory).
    conn.execute(sa.text("SET LOCAL work_mem = '256MB'"))
    marks = watermarks if watermarks is not None else _watermarks(conn)
    digests = _Digests(conn, marks, memo, reference)
    named = scope.named if scope else {}
    tables, by_natural_key = _table_digests(digests, scope, natural)
    kept = {table: digests.of(table, f" AND NOT ({rows}){excluded(named.get(table))}")
            for table, rows in (scope.kept if scope else {}).items()}
    source = mlflow_source(conn)
    mlflow = _mlflow_digests(digests, source, tables, scope) if source is not None else {}
    database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
    declared = declared_changes(conn, marks) if source is not None else {}
    snapshot = conn.execute(sa.text("SELECT pg_current_snapshot()::text")).scalar_one()
    return Fingerprint(datetime.now(UTC).isoformat(timespec="seconds"), database, source, marks,
                       tables, mlflow, scope.__dict__ if scope else None, kept, digests.method, declared,
                       snapshot, natural=by_natural_key if natural else None,
                       named_rows=recorded(conn, named) if named else None)


@dataclass
class _Digests:
    """How one fingerprint digests: within its watermarks, the reference's way (its
    method, its bucket sizes) when it has one."""

    conn: Connection
    marks: dict[str, int | None]
    memo: Memo | None
    reference: Fingerprint | None

    @property
    def method(self) -> int:
        return self.reference.format if self.reference is not None else FORMAT

    def bound(self, table: str) -> int:
        return _bound(self.marks, table)

    def of(self, table: str, where: str = "") -> dict[str, Any] | None:
        """A table's digest up to its watermark (``where`` narrows the rows, alias ``t``);
        None when the table does not exist."""
        conn, method, reference = self.conn, self.method, self.reference
        if not relation_exists(conn, table):
            return None
        if table in TABLE_KEYS and method == METHOD:
            key, keys_of = TABLE_KEYS[table]
            theirs = (reference.tables.get(table) if reference is not None and not where else None) or {}
            keys = _bound_or_zero(self.marks, keys_of) + 1
            size = theirs.get("bucket_size") or max(1, -(-keys // BUCKETS))
            sql = (f"SELECT {row_text(conn, table)} AS r, t.{key} AS k FROM {table} AS t "
                   f"WHERE t.id <= :w{where}")
            rows, digest, buckets = bucketed_digest(conn, sql, {"w": self.bound(table)}, size, method,
                                                    self.memo)
            return {"rows": rows, "hash": digest, "bucket_size": size, "buckets": buckets}
        whole = table_digest(conn, table, f"t.id <= :w{where}", {"w": self.bound(table)}, self.memo, method)
        return {"rows": whole.rows, "hash": whole.digest}


def _table_digests(digests: _Digests, scope: Scope | None, natural: bool
                   ) -> tuple[dict[str, dict[str, Any] | None], dict[str, dict[str, Any]]]:
    """The tables half (the scope's tables, else every ML table), and with ``natural`` the
    rows of :data:`~toolkit.verify.natural_keys.NATURAL_KEYS` digested apart."""
    conn = digests.conn
    named = scope.named if scope else {}
    tables: dict[str, dict[str, Any] | None] = {}
    by_natural_key: dict[str, dict[str, Any]] = {}
    for table in (scope.tables if scope else ML_TABLE_NAMES):
        picked = natural_rows(conn, table) if natural else None
        if picked is None:
            tables[table] = digests.of(table, excluded(named.get(table)))
            continue
        condition, sql = picked
        tables[table] = digests.of(table, f" AND NOT COALESCE({condition}, false)")
        rows, digest = query_digest(conn, sql, {"w": digests.bound(table)}, digests.memo, digests.method)
        if rows:  # none (a ledger emptied by a rollback): the table's digest holds every row
            by_natural_key[table] = {"rows": rows, "hash": digest}
    return tables, by_natural_key


def _mlflow_digests(digests: _Digests, source: str, tables: dict[str, dict[str, Any] | None],
                    scope: Scope | None) -> dict[str, dict[str, Any]]:
    """The MLflow half: each part's digest (the scope's parts, narrowed to its rows); a part
    derived from a table (:data:`~toolkit.verify.mlflow_parts.DERIVED_FROM`) whose digest
    equals the reference's is the reference's."""
    conn, marks, reference = digests.conn, digests.marks, digests.reference
    named = scope.named if scope else {}
    mlflow: dict[str, dict[str, Any]] = {}
    params = {param: digests.bound(table) for param, table in WATERMARK_PARAMS.items()}
    comparable = reference is not None and reference.watermarks == marks
    for part, sql in mlflow_parts(conn, source).items():
        if scope is not None and part not in scope.parts:
            continue
        if scope is not None and part in scope.part_rows:
            # the part's query ends with its WHERE clause (run_artifact_uris does)
            assert "WHERE" in sql.rstrip().rsplit("\n", 1)[-1], part
            sql = f"{sql} AND ({scope.part_rows[part]})"
        derived_from = DERIVED_FROM.get(part)
        if (reference is not None and comparable and derived_from
                and tables.get(derived_from) is not None
                and same_digest(reference.tables.get(derived_from), tables[derived_from])
                and part in reference.mlflow):
            mlflow[part] = reference.mlflow[part]
            continue
        if named_keys := named.get((scope.named_parts if scope else {}).get(part, "")):
            sql = f"SELECT q.r, q.k FROM ({sql}) AS q WHERE true{excluded(named_keys, 'q.k')}"
        if part in KEYED:
            mlflow[part] = _keyed_digest(conn, sql, params, part, marks, reference, digests.method,
                                         digests.memo)
            continue
        rows, digest = query_digest(conn, sql, params, digests.memo, digests.method)
        mlflow[part] = {"rows": rows, "hash": digest}
    return mlflow


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


def same_digest(one: dict[str, Any] | None, other: dict[str, Any] | None) -> bool:
    """Equal digests (buckets only locate a difference; a fingerprint may have none)."""
    if one is None or other is None:
        return one is other
    return (one["rows"], one["hash"]) == (other["rows"], other["hash"])
