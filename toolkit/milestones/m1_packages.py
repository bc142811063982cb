"""Milestone 1: candidate packages go from ``generic`` (7) to ``ml_model`` (14).

Only ``package_type`` changes. Names, versions, files and ``updated_at`` stay as they are,
so rollback can give back the table row for row. Two anomalies block a package's
conversion and are reported, never "fixed":

* the package lives in another project than a candidate using it;
* an ``ml_model`` package with the same project/name/version (status <> 4) exists, so the
  conversion would violate ``uniq_idx_packages_packages_on_project_id_name_version_ml_model``.

A third blocks it because PostgreSQL would: a ``status_message`` over 255 characters.
GitLab's ``check_d6301aedeb`` is NOT VALID, so old rows may break it, but PostgreSQL checks
it on every UPDATE of such a row; truncating the message would be a silent fix.

Two are warnings, and those packages are converted: a package shared by several
candidates, and a version GitLab's current ml_model version rule rejects.

:data:`ELIGIBLE` is the one definition of "convertible", used by the count, the batch
UPDATE and verify alike.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit import catalog
from toolkit.engine.listing import count_of, listed
from toolkit.engine.plan import Milestone
from toolkit.engine.results import Anomaly, Check, StepPlan
from toolkit.engine.step import KeysetPass, Step
from toolkit.mlflow_api.artifact_uri import package_name_sql, path_sql
from toolkit.names import M1_LEDGER as LEDGER
from toolkit.schema.gitlab import PACKAGE_STATUS_NAMES, PACKAGE_TYPE_ML_MODEL
from toolkit.verify.mlflow_view import FROM_EXPERIMENTS, experiment_relations, mlflow_source
from toolkit.verify.named import Fix, Named
from toolkit.words import counted

NAME = "milestone-1"  # this milestone's id: everything else refers to it or to the registry

# GitLab's Gitlab::Regex.semver_regex (anchored), in PostgreSQL's ARE syntax.
SEMVER = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(-((0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(\.(0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(\+([0-9a-zA-Z-]+(\.[0-9a-zA-Z-]+)*))?$"
)
# ml_model_version_name_regex = Regexp.union(semver_regex, /candidate_\d+/): the second
# branch is unanchored, so it matches anywhere in the version.
VERSION_ACCEPTED = f"(p.version ~ '{SEMVER}' OR p.version ~ 'candidate_[0-9]+')"

CROSS_PROJECT = """EXISTS (SELECT 1 FROM ml_candidates x
                  WHERE x.package_id = p.id AND x.project_id IS DISTINCT FROM p.project_id)"""
COLLIDES = """(p.status <> 4 AND EXISTS (
                  SELECT 1 FROM packages_packages q
                  WHERE q.package_type = 14 AND q.project_id = p.project_id AND q.name = p.name
                    AND q.version = p.version AND q.status <> 4 AND q.id <> p.id))"""
LONG_STATUS_MESSAGE = "COALESCE(char_length(p.status_message) > 255, false)"
ELIGIBLE = f"p.package_type = 7 AND NOT {CROSS_PROJECT} AND NOT {COLLIDES} AND NOT {LONG_STATUS_MESSAGE}"
CANDIDATE_LINKED = "p.id IN (SELECT package_id FROM ml_candidates WHERE package_id IS NOT NULL)"

# num_nonnulls(package_id) = 1 is "package_id IS NOT NULL" written so that no index on
# package_id answers it: the batch's id range must choose the rows. As IS NOT NULL, the
# planner walked the whole package_id index in every batch and dropped the rows outside
# the range (35 ms a batch at x25, every candidate with a package read each time), then
# merged the cross-project check from the start of that index again.
CONVERT_BATCH = f"""
WITH targets AS (
    SELECT DISTINCT c.package_id AS id
    FROM ml_candidates c
    WHERE c.id > :lo AND c.id <= :hi AND num_nonnulls(c.package_id) = 1
), converted AS (
    UPDATE packages_packages p SET package_type = 14
    FROM targets t
    WHERE p.id = t.id AND {ELIGIBLE}
    RETURNING p.id
), ledger AS (
    INSERT INTO {LEDGER} (package_id, previous_package_type, run_id)
    SELECT id, 7, :run_id FROM converted
    ON CONFLICT (package_id) DO NOTHING
)
SELECT count(*) FROM converted"""

# Undo exactly the ledger's rows. A row is skipped (and stays in the ledger) when a generic
# package with the same key has appeared since, because restoring it would collide.
RESTORE_COLLIDES = """(p.status <> 4 AND EXISTS (
          SELECT 1 FROM packages_packages q
          WHERE q.package_type = l.previous_package_type AND q.project_id = p.project_id
            AND q.name = p.name AND q.version = p.version AND q.status <> 4 AND q.id <> p.id))"""
RESTORE_BATCH = f"""
WITH restored AS (
    UPDATE packages_packages p SET package_type = l.previous_package_type
    FROM {LEDGER} l
    WHERE l.package_id > :lo AND l.package_id <= :hi AND p.id = l.package_id
      AND p.package_type = 14
      AND NOT {RESTORE_COLLIDES}
    RETURNING p.id
), forgotten AS (
    DELETE FROM {LEDGER} l
    WHERE l.package_id > :lo AND l.package_id <= :hi
      AND (l.package_id IN (SELECT id FROM restored)
           OR NOT EXISTS (SELECT 1 FROM packages_packages gone WHERE gone.id = l.package_id))
)
SELECT count(*) FROM restored"""

# rollback --dry-run: what RESTORE_BATCH would do to each ledger row, counted read-only.
RESTORE_COUNT = f"""
SELECT count(*) FILTER (WHERE p.package_type = 14 AND NOT {RESTORE_COLLIDES}),
       count(*) FILTER (WHERE p.package_type = 14 AND {RESTORE_COLLIDES}),
       count(*) FILTER (WHERE p.id IS NULL)
FROM {LEDGER} l LEFT JOIN packages_packages p ON p.id = l.package_id"""


def restore_count(conn: Connection) -> dict[str, int]:
    restored, kept, gone = conn.execute(sa.text(RESTORE_COUNT)).one()
    return {"packages restored to generic (7)": restored,
            "packages kept ml_model (a generic package with the same key exists now)": kept,
            "ledger rows of packages deleted since (forgotten)": gone}


URI_CHANGES = "runs whose MLflow artifact_uri changes (GitLab's rule; declared)"


def artifact_uri_changes_sql(conn: Connection) -> str:
    """Runs whose ``artifact_uri`` GitLab answers differently once the eligible packages are
    ``ml_model``: the URI by GitLab's rule now against the same rule with the conversion
    applied (:mod:`toolkit.mlflow_api.artifact_uri`). Each one milestone 1 converts goes from
    ``…/packages/generic/…`` to ``…/packages/ml_models/…/files/``."""
    experiments, _ = experiment_relations(mlflow_source(conn) or FROM_EXPERIMENTS)
    name = package_name_sql(conn, experiments, canonical=False)
    converted = (f"CASE WHEN {ELIGIBLE} AND {CANDIDATE_LINKED} THEN {PACKAGE_TYPE_ML_MODEL} "
                 "ELSE p.package_type END")
    return f"""
SELECT count(*) FROM ml_candidates c LEFT JOIN packages_packages p ON p.id = c.package_id
WHERE ({path_sql("p.package_type", name)}) IS DISTINCT FROM ({path_sql(converted, name)})"""


RESOLUTIONS = {
    "cross_project_package": (
        "The package belongs to another project than its candidate, so moving it under the "
        "candidate's model would expose it to the wrong project. Decide which project owns the "
        "artifacts: re-upload them to the candidate's project, or unlink the package from the "
        f"candidate (ml_candidates.package_id = NULL). Then run `toolkit migrate {NAME}` again."
    ),
    "ml_model_collision": (
        "An ml_model package with the same project, name and version already exists, so the "
        "conversion would break the unique index. Keep one: mark the unwanted package "
        f"pending destruction (status 4) in GitLab, then run `toolkit migrate {NAME}` again."
    ),
    "status_message_too_long": (
        "The package's status_message is longer than GitLab's 255-character limit (an old row the "
        "NOT VALID check never checked), and PostgreSQL enforces that check on any update. Shorten "
        f"the message (it is an error text shown in the UI), then run `toolkit migrate {NAME}` "
        "again."
    ),
    "shared_package": (
        "Several candidates use one package. It is converted once; all of them keep using it. "
        "Nothing to do unless each candidate should own its own artifacts."
    ),
    "version_rejected_by_ml_model_rule": (
        "GitLab's ml_model version rule (semver or candidate_N) rejects this legacy version. The "
        "package is converted as the blueprint asks; GitLab must accept legacy versions, or it "
        "will refuse to edit these packages."
    ),
}


def find_anomalies(conn: Connection) -> list[Anomaly]:
    cross = listed(conn, f"""
        SELECT p.id AS package_id, p.project_id AS package_project_id,
               array_agg(c.id ORDER BY c.id) AS candidate_ids,
               array_agg(DISTINCT c.project_id) AS candidate_project_ids
        FROM packages_packages p JOIN ml_candidates c ON c.package_id = p.id
        WHERE p.package_type = 7 AND {CROSS_PROJECT}
        GROUP BY p.id ORDER BY p.id""")
    collisions = listed(conn, f"""
        SELECT p.id AS package_id, p.project_id, p.name, p.version,
               (SELECT array_agg(q.id ORDER BY q.id) FROM packages_packages q
                WHERE q.package_type = 14 AND q.project_id = p.project_id AND q.name = p.name
                  AND q.version = p.version AND q.status <> 4) AS ml_model_package_ids
        FROM packages_packages p
        WHERE p.package_type = 7 AND {CANDIDATE_LINKED} AND {COLLIDES}
        ORDER BY p.id""")
    long_messages = listed(conn, f"""
        SELECT p.id AS package_id, char_length(p.status_message) AS status_message_length
        FROM packages_packages p
        WHERE p.package_type = 7 AND {CANDIDATE_LINKED} AND {LONG_STATUS_MESSAGE}
        ORDER BY p.id""")
    shared = listed(conn, """
        SELECT p.id AS package_id, array_agg(c.id ORDER BY c.id) AS candidate_ids
        FROM packages_packages p JOIN ml_candidates c ON c.package_id = p.id
        WHERE p.package_type = 7
        GROUP BY p.id HAVING count(*) > 1 ORDER BY p.id""")
    rejected = listed(conn, f"""
        SELECT p.id AS package_id, p.version
        FROM packages_packages p
        WHERE {ELIGIBLE} AND {CANDIDATE_LINKED} AND NOT COALESCE({VERSION_ACCEPTED}, false)
        ORDER BY p.id""")
    found = (
        ("cross_project_package", "package in another project than its candidate", True, cross),
        ("ml_model_collision", "conversion would collide with an existing ml_model package", True,
         collisions),
        ("status_message_too_long", "status_message over 255 characters (NOT VALID check)", True,
         long_messages),
        ("shared_package", "package shared by several candidates", False, shared),
        ("version_rejected_by_ml_model_rule", "version GitLab's ml_model rule rejects", False, rejected),
    )
    return [Anomaly(kind=kind, title=title, blocking=blocking, resolution=RESOLUTIONS[kind], rows=rows)
            for kind, title, blocking, rows in found]


# The rows each blocking anomaly names, as the plan lists them: the operator is told to
# change them by hand, so the baseline the first run takes records them (verify/named.py).
NAMED_SQL = f"""
SELECT 'packages_packages' AS t, p.id, 'cross_project_package' AS kind FROM packages_packages p
WHERE p.package_type = 7 AND {CROSS_PROJECT}
UNION ALL
SELECT 'ml_candidates', c.id, 'cross_project_package' FROM ml_candidates c
JOIN packages_packages p ON p.id = c.package_id
WHERE p.package_type = 7 AND c.project_id IS DISTINCT FROM p.project_id
UNION ALL
SELECT 'packages_packages', p.id, 'ml_model_collision' FROM packages_packages p
WHERE p.package_type = 7 AND {CANDIDATE_LINKED} AND {COLLIDES}
UNION ALL
SELECT 'packages_packages', q.id, 'ml_model_collision' FROM packages_packages p
JOIN packages_packages q ON q.package_type = 14 AND q.project_id = p.project_id AND q.name = p.name
 AND q.version = p.version AND q.status <> 4 AND q.id <> p.id
WHERE p.package_type = 7 AND p.status <> 4 AND {CANDIDATE_LINKED}
UNION ALL
SELECT 'packages_packages', p.id, 'status_message_too_long' FROM packages_packages p
WHERE p.package_type = 7 AND {CANDIDATE_LINKED} AND {LONG_STATUS_MESSAGE}"""


def named_rows(conn: Connection) -> Named:
    """Every row a blocking anomaly names (table -> id -> kinds), none left out."""
    named: Named = {}
    for table, key, kind in conn.execute(sa.text(NAMED_SQL)):
        kinds = named.setdefault(table, {}).setdefault(str(key), [])
        if kind not in kinds:
            kinds.append(kind)
    return named


# How each fix RESOLUTIONS prescribes may change the rows its anomaly names. updated_at may
# change with it: GitLab sets it when it saves the row. A cross-project package itself stays
# as it was (only its candidates' link goes), so no fix names it and it must be unchanged.
FIXES = (
    Fix(kind="cross_project_package", table="ml_candidates", columns=("package_id", "updated_at"),
        holds="t.package_id IS NULL OR EXISTS (SELECT 1 FROM packages_packages k "
              "WHERE k.id = t.package_id AND k.project_id = t.project_id)",
        said="no longer linked to the other project's package",
        parts=("runs", "run_artifact_uris")),
    Fix(kind="ml_model_collision", table="packages_packages", columns=("status", "updated_at"),
        holds="t.status = 4", said="marked pending destruction (status 4)",
        gone="gone: GitLab destroys a package marked pending destruction"),
    Fix(kind="status_message_too_long", table="packages_packages",
        columns=("status_message", "updated_at"),
        holds="COALESCE(char_length(t.status_message), 0) <= 255",
        said="status_message shortened to at most 255 characters"),
    # once fixed, the milestone converts the package itself (and its ledger says so)
    Fix(kind="", table="packages_packages", columns=("package_type",),
        holds=f"t.package_type = 14 AND t.id IN (SELECT package_id FROM {LEDGER})",
        said="converted to ml_model by this milestone"),
)


class ConvertCandidatePackages(Step):
    name = "convert-candidate-packages"
    description = "candidate packages: generic (7) -> ml_model (14)"

    def forward(self) -> list[KeysetPass]:
        return [KeysetPass(self.name, self.description, "ml_candidates", CONVERT_BATCH,
                           locks=("packages_packages", "ml_candidates"),
                           retry_unique_violation=True, driving_filter="package_id IS NOT NULL")]

    def backward(self) -> list[KeysetPass]:
        return [KeysetPass(f"{self.name}:revert", "restore converted packages to generic (7)",
                           LEDGER, RESTORE_BATCH, key="package_id", locks=("packages_packages",),
                           retry_unique_violation=True, count=restore_count)]

    def plan(self, conn: Connection) -> StepPlan:
        by_status = conn.execute(sa.text(f"""
            SELECT p.status, count(*) FROM packages_packages p
            WHERE {ELIGIBLE} AND {CANDIDATE_LINKED} GROUP BY p.status ORDER BY p.status""")).all()
        breakdown = {PACKAGE_STATUS_NAMES.get(s, str(s)): n for s, n in by_status}
        by_type: dict[str, int] = dict(conn.execute(sa.text(f"""
            SELECT CASE p.package_type WHEN 7 THEN 'generic' WHEN 14 THEN 'ml_model' ELSE 'other' END,
                   count(*)
            FROM packages_packages p WHERE {CANDIDATE_LINKED} GROUP BY 1""")).all())
        uri_changes = artifact_uri_changes_sql(conn)
        context = {
            "candidate packages already ml_model (unchanged)": by_type.get("ml_model", 0),
            "candidate packages of other types (never touched)": by_type.get("other", 0),
            "candidate packages still generic": by_type.get("generic", 0),
            URI_CHANGES: conn.execute(sa.text(uri_changes)).scalar_one(),
        }
        return StepPlan(step=self.name, description=self.description, rows=sum(breakdown.values()),
                        breakdown=breakdown, context=context, anomalies=find_anomalies(conn),
                        sql=[*self.forward_sql(), f"-- {URI_CHANGES}\n{uri_changes.strip()}"])

    def remaining(self, conn: Connection) -> int:
        return conn.execute(sa.text(
            f"SELECT count(*) FROM packages_packages p WHERE {ELIGIBLE} AND {CANDIDATE_LINKED}"
        )).scalar_one()

    def rollback_checks(self, conn: Connection) -> list[Check]:
        left = listed(conn, f"SELECT package_id FROM {LEDGER} ORDER BY package_id") \
            if catalog.relation_exists(conn, LEDGER) else []
        return [Check(
            name="every converted package restored",
            ok=not left,
            detail="the ledger is empty" if not left else
            f"{counted(count_of(left), 'package')} kept as ml_model: a generic package with the same key "
            "exists now",
            remedy=f"resolve the duplicate generic package, then run `toolkit rollback {NAME}` again"
            if left else None,
            rows=left,
        )]

    def verify(self, conn: Connection) -> list[Check]:
        reasons: Counter[str] = Counter()

        def tally(row: dict[str, Any]) -> bool:
            reasons[row["reason"]] += 1
            return True

        remaining = listed(conn, f"""
            SELECT p.id AS package_id,
                   CASE WHEN {CROSS_PROJECT} THEN 'cross_project_package'
                        WHEN {COLLIDES} THEN 'ml_model_collision'
                        WHEN {LONG_STATUS_MESSAGE} THEN 'status_message_too_long'
                        ELSE 'not_yet_converted' END AS reason
            FROM packages_packages p
            WHERE p.package_type = 7 AND {CANDIDATE_LINKED}
            ORDER BY p.id""", keep=tally)
        remedies = {**RESOLUTIONS,
                    "not_yet_converted": f"new or not yet processed: run `toolkit migrate {NAME}`"}
        checks = [Check(
            name="no candidate-linked generic packages",
            ok=not remaining,
            detail="none remain" if not remaining else
            f"{count_of(remaining)} remain: " + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())),
            remedy=" | ".join(f"{k}: {remedies[k]}" for k in sorted(reasons)) or None,
            rows=remaining,
        )]
        undone = [] if not catalog.relation_exists(conn, LEDGER) else listed(conn, f"""
            SELECT l.package_id, p.package_type FROM {LEDGER} l
            JOIN packages_packages p ON p.id = l.package_id
            WHERE p.package_type <> 14 ORDER BY l.package_id""")
        checks.append(Check(
            name="converted packages are still ml_model",
            ok=not undone,
            detail="all are" if not undone else f"{count_of(undone)} converted packages changed type since",
            remedy=f"find out what changed them; run `toolkit migrate {NAME}` to convert them again"
            if undone else None,
            rows=undone,
        ))
        return checks


def ledger_size(conn: Connection) -> int:
    if not catalog.relation_exists(conn, LEDGER):
        return 0
    return conn.execute(sa.text(f"SELECT count(*) FROM {LEDGER}")).scalar_one()


MILESTONE_1 = Milestone(
    name=NAME,
    title="Candidate packages become ml_model packages",
    steps=(ConvertCandidatePackages(),),
    reads=("ml_candidates", "packages_packages"),
    updates=("packages_packages",),
    # only packages a candidate links to; every other package must stay as it was
    may_change={"packages_packages": "t.id IN (SELECT c.package_id FROM ml_candidates c "
                                     "WHERE c.package_id IS NOT NULL)"},
    named=named_rows,
    fixes=FIXES,
    # A run without a package has its artifact_uri from ml_candidates, ml_experiments and
    # ml_models alone, none of which milestone 1 writes: only runs with a package are hashed
    # (a tenth of the runs at x25; the whole part was most of the proof's time).
    may_change_parts={"run_artifact_uris": "c.package_id IS NOT NULL"},
)
