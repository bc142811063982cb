"""What MLflow clients wrote through ``toolkit mlflow serve`` since a baseline was taken,
and which differences from that baseline it accounts for.

A training job keeps running while an operator migrates: it finishes a run
(``set_terminated``: status, end_time), logs to a run older than the baseline, deletes a
run or an experiment, sets an experiment tag, updates a model. Rows it inserts lie past the
baseline's watermarks and are not compared; rows it updates or deletes are, and differ.
Every write records its rows in ``toolkit.mlflow_writes`` in its own transaction
(:func:`toolkit.mlflow_api.stages.record_write`), so verify knows them: the writes since the
baseline are exactly those of transactions the baseline's snapshot did not see (the
fingerprint keeps ``pg_current_snapshot()``; a write in flight while it was taken counts).

A difference is the application's when every bucket a keyed part differs in holds a run,
model or experiment those writes name (:data:`toolkit.verify.mlflow_parts.KEYED`). With one
key a bucket (up to 512 runs or models) that is exact; above, a bucket is a range of ids, and
a change the migration made to another run of the same range would go with it: the
fingerprint names the ranges, and ``toolkit fingerprint --compare`` reads every row. A
change nothing recorded (the migration's, or a write that bypassed the server) still fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.catalog import relation_exists
from toolkit.names import M4_ARCHIVE_EXPERIMENTS, M4_EXPERIMENT_IDS
from toolkit.verify.differences import differing_buckets
from toolkit.verify.fingerprint import TABLE_KEYS
from toolkit.verify.mlflow_parts import KEYED
from toolkit.verify.mlflow_view import experiment_relations, mlflow_source

WRITES = "toolkit.mlflow_writes"

# The transaction id (xid8) of the write that inserted a row of mlflow_writes, from its
# 32-bit xmin and the epoch of the current snapshot (a recent row: the same or the last one).
_XID8 = """(((ref.x >> 32) << 32) + w.xmin::text::bigint
            - CASE WHEN w.xmin::text::bigint > (ref.x & 4294967295) AND ref.x >= 4294967296
                   THEN 4294967296 ELSE 0 END)::text::xid8"""

SINCE = f"""
WITH ref AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS x)
SELECT w.table_name, w.row_id, w.action, w.candidate_id, w.model_id
FROM {WRITES} w, ref
WHERE NOT pg_visible_in_snapshot({_XID8}, CAST(:snapshot AS pg_snapshot))"""

EXPERIMENT_TABLES = ("ml_experiments", M4_ARCHIVE_EXPERIMENTS, M4_EXPERIMENT_IDS)


@dataclass
class Written:
    """The keys MLflow clients wrote since the baseline, by what a key names (the key
    tables of :data:`KEYED`)."""

    keys: dict[str, set[int]] = field(default_factory=dict)

    def of(self, table: str) -> set[int]:
        return self.keys.get(table, set())

    def accounts_for(self, part: str, before: dict[str, Any] | None, after: dict[str, Any] | None,
                     marks: dict[str, int | None]) -> bool:
        """Whether a difference in ``part`` (an MLflow part, or ``tables.<table>``) lies
        only in buckets that hold written keys the baseline had (within its watermark: a run
        made since cannot vouch for an older one that shares its bucket)."""
        table_name = part.removeprefix("tables.")
        if part.startswith("tables.") and table_name in TABLE_KEYS:
            table = TABLE_KEYS[table_name][1]
        elif part in KEYED:
            table = KEYED[part][0]
        else:
            return False
        found = differing_buckets(before, after)
        if not found or not found[1]:
            return False
        size, buckets = found
        bound = marks.get(table) or 0
        written = {key // size for key in self.of(table) if key <= bound}
        return set(buckets) <= written


def written_since(conn: Connection, snapshot: str | None) -> Written:
    """What the server's writes since ``snapshot`` name: runs, models, model versions,
    experiments and packages (by row id), each also through the others (a model's
    experiment, a written model's versions)."""
    if snapshot is None or not relation_exists(conn, WRITES):
        return Written()
    rows = conn.execute(sa.text(SINCE), {"snapshot": snapshot}).all()
    runs = {r.candidate_id for r in rows if r.candidate_id is not None}
    runs |= {r.row_id for r in rows if r.table_name == "ml_candidates"}
    models = {r.model_id for r in rows if r.model_id is not None}
    models |= {r.row_id for r in rows if r.table_name == "ml_models"}
    versions = {r.row_id for r in rows if r.table_name == "ml_model_versions"}
    experiments = {r.row_id for r in rows if r.table_name in EXPERIMENT_TABLES}
    tag_rows = [r.row_id for r in rows if r.table_name == "ml_experiment_metadata"]
    if models and relation_exists(conn, "ml_model_versions"):
        versions |= set(conn.execute(sa.text("SELECT id FROM ml_model_versions WHERE model_id = ANY(:m)"),
                                     {"m": sorted(models)}).scalars())
    source = mlflow_source(conn)
    if source is not None:
        relation, _ = experiment_relations(source)
        if models:
            experiments |= set(conn.execute(sa.text(f"SELECT id FROM {relation} WHERE model_id = ANY(:m)"),
                                            {"m": sorted(models)}).scalars())
        if tag_rows and relation_exists(conn, "ml_experiment_metadata"):
            experiments |= set(conn.execute(sa.text(
                "SELECT experiment_id FROM ml_experiment_metadata WHERE id = ANY(:t)"),
                {"t": tag_rows}).scalars())
    packages = {r.row_id for r in rows if r.table_name == "packages_packages"}
    return Written({"ml_candidates": runs, "ml_models": models, "ml_model_versions": versions,
                    "ml_experiments": experiments, "packages_packages": packages})


def said(written: Written, marks: dict[str, int | None]) -> str:
    """"N runs written by MLflow clients …": what existed at the baseline and was written
    since (the models and experiments besides)."""
    nouns = (("ml_candidates", "run"), ("ml_models", "model"), ("ml_experiments", "experiment"))
    counts = [(len({k for k in written.of(t) if k <= (marks.get(t) or 0)}), noun) for t, noun in nouns]
    listed = [f"{n} {noun}{'s' if n != 1 else ''}" for n, noun in counts]
    besides = [text for (n, _), text in zip(counts[1:], listed[1:], strict=True) if n]
    return (f"{listed[0]} written by MLflow clients through toolkit mlflow serve since the baseline"
            + (f" (and {', '.join(besides)})" if besides else ""))
