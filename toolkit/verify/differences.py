"""What differs between two fingerprints, said so a user can act on it: each differing
table or MLflow part, whether the milestone changes it on purpose, what a difference in it
means, and, for a keyed part or table, the runs, experiments or models it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolkit.verify.fingerprint import KEY_NOUNS, TABLE_KEYS, Fingerprint, same_digest
from toolkit.verify.mlflow_parts import KEYED, NOT_COMPARABLE
from toolkit.verify.natural_keys import NATURAL_KEYS


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
            if not same_digest(b, a):
                found.append(Difference(f"tables.{table}", b, a, table in changes,
                                        where=locate(table, b, a)))
        for table in keys(before.kept, after.kept):
            b, a = before.kept.get(table), after.kept.get(table)
            if not same_digest(b, a):
                found.append(Difference(f"tables.{table} (rows it may not change)", b, a, False))
        # rows made by the toolkit since ``before`` was taken are rows added since: only what
        # it had is compared (and must still be there)
        for table in sorted(before.natural or {}):
            b, a = (before.natural or {}).get(table), (after.natural or {}).get(table)
            if not same_digest(b, a):
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
        if not same_digest(b, a):
            found.append(Difference(f"mlflow.{part}", b, a, False, where=locate(part, b, a)))
    return found
