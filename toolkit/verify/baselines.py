"""The fingerprint taken before each milestone, kept in ``toolkit.fingerprints``.

It is taken once, when a milestone first starts (a resumed run keeps the original), and
forgotten when the milestone is rolled back, so the next attempt starts from a fresh one.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine.results import Check
from toolkit.schema.own import SCHEMA
from toolkit.timestamps import shown
from toolkit.verify.digest import Memo
from toolkit.verify.fingerprint import Difference, Fingerprint, compare, take

TABLE = f"{SCHEMA}.fingerprints"


def _table_exists(conn: Connection) -> bool:
    return conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": TABLE}).scalar_one()


def load(conn: Connection, milestone: str) -> Fingerprint | None:
    if not _table_exists(conn):
        return None
    body = conn.execute(sa.text(f"SELECT body::text FROM {TABLE} WHERE milestone = :m"),
                        {"m": milestone}).scalar()
    return Fingerprint.loads(body) if body else None


def save(conn: Connection, milestone: str, fingerprint: Fingerprint, run_id: int | None) -> None:
    """Store (or, when the operator re-takes it, replace) the milestone's baseline."""
    conn.execute(sa.text(f"""
        INSERT INTO {TABLE} (milestone, run_id, body) VALUES (:m, :r, CAST(:b AS jsonb))
        ON CONFLICT (milestone) DO UPDATE SET body = EXCLUDED.body, run_id = EXCLUDED.run_id,
                                              taken_at = now()
    """), {"m": milestone, "r": run_id, "b": fingerprint.dumps()})
    conn.commit()


def forget(conn: Connection, milestone: str) -> None:
    if _table_exists(conn):
        conn.execute(sa.text(f"DELETE FROM {TABLE} WHERE milestone = :m"), {"m": milestone})
        conn.commit()


def _summary(differences: list[Difference]) -> str:
    return "; ".join(d.describe() for d in differences)


def checks_against_baseline(conn: Connection, milestone: str, *, changes: tuple[str, ...] = (),
                            compare_tables: bool = True, rolled_back: bool = False,
                            memo: Memo | None = None) -> list[Check]:
    """Compare the database with the fingerprint taken before ``milestone``.

    ``changes``: tables the milestone changes on purpose (after a rollback: none).
    ``compare_tables=False`` once a later milestone has started changing tables: the
    MLflow view must still be equal, the tables are that later milestone's business.
    ``rolled_back``: after a rollback everything must be as it was.
    """
    baseline = load(conn, milestone)
    if baseline is None:
        return []
    now = take(conn, baseline.watermarks, memo, reference=baseline)
    differences = compare(baseline, now, changes=changes, tables=compare_tables)
    hint = (" (if the application itself updated these rows since, e.g. a run finished, "
            f"accept its change with `toolkit fingerprint --baseline {milestone}`)")
    verb = "is back to" if rolled_back else "equals"
    name = f"the MLflow view {verb} the fingerprint taken before {milestone}"
    mlflow = [d for d in differences if d.part.startswith("mlflow")]
    if now.source is None:
        # Only `toolkit archive drop` gets here (it requires milestone 4 to verify first,
        # this comparison included): the operator gave up the experiment id mapping.
        checks = [Check(name=name, ok=True, detail="not comparable any more: the experiment id mapping "
                        "(toolkit.m4_archive_ml_experiments) was dropped with the archive")]
    else:
        checks = [Check(name=name, ok=not mlflow, detail=_summary(mlflow) + hint if mlflow else
                        f"{len(now.mlflow)} parts equal (computed from {now.source}; "
                        f"baseline {shown(baseline.taken_at)})")]
    if compare_tables:
        unexpected = [d for d in differences if d.part.startswith("tables") and not d.expected]
        expected = [d.part.removeprefix("tables.") for d in differences if d.expected]
        checks.append(Check(
            name="every ML table is as it was" if rolled_back or not changes
            else "every other ML table is unchanged",
            ok=not unexpected,
            detail=_summary(unexpected) + hint if unexpected else
            "equal" + (f"; changed on purpose: {', '.join(expected)}" if expected else ""),
        ))
    return checks
