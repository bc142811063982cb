"""Rows a milestone's blocking anomalies name, and how the operator's fix may change them.

A blocking anomaly asks the operator to change rows by hand (milestone 1: unlink a package
from its candidate, mark a colliding package pending destruction, shorten a status message),
then to run the milestone again. Those rows lie where the milestone's baseline says nothing
may change, so without this the verify that follows the fix failed every time, and its
advice (run the milestone again) led back to the same failure.

The run that takes the baseline records which rows the anomalies name (:class:`Named`), in
the baseline's scope, and the rows themselves as they were (``Fingerprint.named_rows``). The
baseline's digests leave those rows out; verify compares each of them on its own: it must
be unchanged, or changed only in the columns a :class:`Fix` of its anomaly allows, and only
when the fix's condition holds (status 4, a message of at most 255 characters, ...). A row
changed in any other way, or gone, fails, as does any change to a row no anomaly names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# table -> row id (as text: JSON keys) -> the anomaly kinds naming it
Named = dict[str, dict[str, list[str]]]


@dataclass(frozen=True, kw_only=True)
class Fix:
    """How the fix an anomaly prescribes may change a row it names in ``table``.

    ``columns`` may differ from the recorded row when ``holds`` (SQL on the row now, alias
    ``t``) is true; ``said`` describes the change. ``parts``: the MLflow parts keyed by this
    table's id whose row for it the change alters (they leave the named rows out too, and
    the row's own comparison stands in for them). ``kind`` "" applies to every named row of
    the table: the milestone's own change to it (milestone 1 converts a package once fixed).
    ``gone``: what it means when the row is gone since (the fix leads the application to
    delete it: a package marked pending destruction is destroyed), "" when it must stay.
    """

    kind: str
    table: str
    columns: tuple[str, ...]
    holds: str
    said: str
    parts: tuple[str, ...] = ()
    gone: str = ""


@dataclass
class Outcome:
    """Each named row compared with the row recorded: fixed as told, unchanged, or not."""

    fixed: list[str] = field(default_factory=list)
    unchanged: int = 0
    wrong: list[str] = field(default_factory=list)


def recorded(conn: Connection, named: Named) -> dict[str, dict[str, Any]]:
    """The named rows as they are (in the baseline's snapshot): table -> id -> row."""
    rows: dict[str, dict[str, Any]] = {}
    for table, ids in named.items():
        found = conn.execute(sa.text(f"SELECT t.id, to_jsonb(t)::text FROM {table} AS t "
                                     "WHERE t.id = ANY(:ids)"), {"ids": [int(i) for i in ids]}).all()
        rows[table] = {str(i): json.loads(body) for i, body in found}
    return rows


def excluded(ids: dict[str, list[str]] | None, column: str = "t.id") -> str:
    """`` AND NOT (column = ANY(...))``: the named rows, left out of a digest (ids are ints;
    a row without a key stays in)."""
    if not ids:
        return ""
    listed = ",".join(str(int(i)) for i in sorted(ids, key=int))
    return f" AND NOT COALESCE({column} = ANY('{{{listed}}}'::bigint[]), false)"


def compare(conn: Connection, named: Named, before: dict[str, dict[str, Any]],
            fixes: tuple[Fix, ...], nouns: dict[str, str]) -> Outcome:
    """Each named row now against the row recorded, under the fixes of its anomalies."""
    outcome = Outcome()
    for table, ids in sorted(named.items()):
        rules = [f for f in fixes if f.table == table]
        conditions = "".join(f", ({f.holds})" for f in rules)
        found = {str(r[0]): r for r in conn.execute(sa.text(
            f"SELECT t.id, to_jsonb(t)::text{conditions} FROM {table} AS t WHERE t.id = ANY(:ids)"),
            {"ids": [int(i) for i in ids]})}
        noun = nouns.get(table, table)
        for key in sorted(ids, key=int):
            was, row = before.get(table, {}).get(key), found.get(key)
            if was is None:
                continue  # not there when the baseline was taken: nothing recorded to compare
            if row is None:
                gone = [f.gone for f in rules if f.gone and f.kind in ids[key]]
                if gone:
                    outcome.fixed.append(f"{noun} {key} {gone[0]}")
                else:
                    outcome.wrong.append(f"{noun} {key} ({', '.join(ids[key])}) is gone")
                continue
            now = json.loads(row[1])
            changed = sorted(c for c in set(was) | set(now) if was.get(c) != now.get(c))
            if not changed:
                outcome.unchanged += 1
                continue
            applying = [f for f, holds in zip(rules, row[2:], strict=True)
                        if holds and (f.kind == "" or f.kind in ids[key])]
            allowed = {c for f in applying for c in f.columns}
            beyond = [c for c in changed if c not in allowed]
            if beyond:
                outcome.wrong.append(f"{noun} {key} ({', '.join(ids[key])}) changed beyond its fix: "
                                     f"{', '.join(beyond)}")
            else:
                said = [f.said for f in applying if set(f.columns) & set(changed)]
                outcome.fixed.append(f"{noun} {key} {' and '.join(said)}")
    return outcome
