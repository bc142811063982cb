"""The fingerprint taken before each milestone, kept in ``toolkit.fingerprints``.

It is taken once, when a milestone first starts (a resumed run keeps the original), and
forgotten when the milestone is rolled back, so the next attempt starts from a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.engine import writes
from toolkit.engine.results import Check
from toolkit.schema.own import SCHEMA
from toolkit.timestamps import shown
from toolkit.verify import app_writes, named
from toolkit.verify.differences import Difference, compare
from toolkit.verify.digest import Memo
from toolkit.verify.fingerprint import Fingerprint, Scope, take
from toolkit.verify.mlflow_parts import NOT_COMPARABLE, PART_TABLES
from toolkit.verify.named import Fix
from toolkit.words import counted

TABLE = f"{SCHEMA}.fingerprints"


def _table_exists(conn: Connection) -> bool:
    return bool(conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": TABLE}).scalar_one())


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


def accept_remedy(milestone: str, rolled_back: bool = False) -> str:
    """What to do about a difference from the baseline: find its cause; if it is wanted,
    accept it, and the command that then records the milestone as it is (never a loop)."""
    then = (f"`toolkit rollback {milestone}` checks it again" if rolled_back
            else f"`toolkit migrate {milestone}` verifies it again and records it verified")
    return (f"find out what changed them (`toolkit history` lists the toolkit's runs); if the change "
            f"is wanted (GitLab itself, e.g. a run finished), accept the database as it is with "
            f"`toolkit fingerprint --baseline {milestone}`, then {then}")


def checks_against_baseline(conn: Connection, milestone: str, *, changes: tuple[str, ...] = (),
                            compare_tables: bool = True, rolled_back: bool = False,
                            memo: Memo | None = None, fixes: tuple[Fix, ...] = ()) -> list[Check]:
    """Compare the database with the fingerprint taken before ``milestone``.

    ``changes``: tables the milestone changes on purpose (after a rollback: none).
    ``compare_tables=False`` once a later milestone has started changing tables: the
    MLflow view must still be equal, the tables are that later milestone's business.
    ``rolled_back``: after a rollback everything must be as it was.
    ``fixes``: how the operator's fix of a blocking anomaly may change the rows it named
    (verify/named.py); those rows are compared one by one, the rest by digest.

    A baseline a run took reads only the milestone's scope; what lies outside is proven
    untouched from the rows the milestone's runs wrote (:func:`_scoped_checks`).
    """
    baseline = load(conn, milestone)
    if baseline is None:
        return []
    scope = baseline.scoped
    now = take(conn, baseline.watermarks, memo, reference=baseline,
               scope=_to_read_again(scope, changes, compare_tables))
    differences = compare(baseline, now, changes=changes, tables=compare_tables)
    mlflow = [d for d in differences if d.part.startswith("mlflow")]
    unexpected = [d for d in differences if d.part.startswith("tables") and not d.expected]
    # The application's own writes through the server since the baseline (app_writes.py):
    # a difference confined to the runs, models and experiments they name is theirs.
    written = (app_writes.written_since(conn, baseline.snapshot) if mlflow or unexpected
               else app_writes.Written())
    seen = _Seen(milestone, baseline, now, written, _Proof.of(conn, milestone, scope) if scope else None,
                 accept_remedy(milestone, rolled_back))
    checks = [_mlflow_check(seen, mlflow, rolled_back)]
    if compare_tables:
        expected = [d.part.removeprefix("tables.") for d in differences if d.expected]
        checks.append(_tables_check(seen, unexpected, expected, changes, rolled_back))
        if scope is not None and scope.named and baseline.named_rows is not None:
            checks.append(_named_check(conn, scope, baseline.named_rows, fixes, seen.remedy))
    return checks


@dataclass(frozen=True)
class _Seen:
    """One comparison with a milestone's baseline: the fingerprints, what MLflow clients
    wrote since, what the milestone's runs prove of what was not read again, and the
    remedy a difference gets."""

    milestone: str
    baseline: Fingerprint
    now: Fingerprint
    written: app_writes.Written
    proof: _Proof | None
    remedy: str

    @property
    def hint(self) -> str:
        return f" (if the change is wanted, accept it with `toolkit fingerprint --baseline {self.milestone}`)"

    def theirs(self, differences: list[Difference]) -> list[Difference]:
        """The differences confined to what MLflow clients wrote since the baseline."""
        return [d for d in differences
                if self.written.accounts_for(d.part.removeprefix("mlflow."), d.before, d.after,
                                             self.baseline.watermarks)]

    def said_theirs(self, theirs: list[Difference], prefix: str) -> str:
        return (f"{app_writes.said(self.written, self.baseline.watermarks)}: "
                f"{', '.join(d.part.removeprefix(prefix) for d in theirs)} differ only at {_at(theirs)}")


def _mlflow_check(seen: _Seen, mlflow: list[Difference], rolled_back: bool) -> Check:
    """The MLflow view against the baseline: equal but for what clients wrote since and the
    milestones' declared differences; parts the baseline did not read proven by its runs."""
    now, baseline, proof = seen.now, seen.baseline, seen.proof
    verb = "is back to" if rolled_back else "equals"
    name = f"the MLflow view {verb} the fingerprint taken before {seen.milestone}"
    theirs = seen.theirs(mlflow)
    mlflow = [d for d in mlflow if d not in theirs]
    if now.source is None:
        # Only `toolkit archive drop` gets here (it requires milestone 4 to verify first,
        # this comparison included): the operator gave up the experiment id mapping.
        return Check(name=name, ok=True, detail="not comparable any more: the experiment id mapping "
                     "(toolkit.m4_archive_ml_experiments) was dropped with the archive")
    if proof is not None and proof.unproven_parts:
        return Check(name=name, ok=False, detail=proof.unproven_parts, remedy=proof.remedy)
    # The parts equal because the milestone's runs never wrote their tables are named below
    # (parts_not_read), in words: not as "untouched by its runs".
    computed = (f"{counted(len(now.mlflow) - len(theirs), 'part')} equal (computed from {now.source}; "
                f"baseline {shown(baseline.taken_at)})")
    if theirs:
        computed += f"; {seen.said_theirs(theirs, 'mlflow.')}"
    if declared := _declared(now, seen.milestone):
        computed += f"; declared differences, from the ledgers: {declared}"
    if skipped := NOT_COMPARABLE.get(now.source or "", ()):
        computed += (f"; not comparable after the archive drop: {', '.join(skipped)} "
                     "(the experiments' own tags went with it; the models' metadata is served)")
    if proof is not None:
        computed += f"; {proof.parts_not_read}"
    return Check(name=name, ok=not mlflow, detail=_summary(mlflow) + seen.hint if mlflow else computed,
                 remedy=seen.remedy if mlflow else None, next_step=seen.remedy if mlflow else None)


def _tables_check(seen: _Seen, unexpected: list[Difference], expected: list[str], changes: tuple[str, ...],
                  rolled_back: bool) -> Check:
    """The ML tables against the baseline: those the milestone changes on purpose aside,
    equal but for what clients wrote since; tables not read again proven by its runs."""
    proof = seen.proof
    tables_theirs = seen.theirs(unexpected)
    unexpected = [d for d in unexpected if d not in tables_theirs]
    problems = _summary(unexpected) + seen.hint if unexpected else ""
    if proof is not None and proof.stray:
        problems = "; ".join(p for p in (proof.stray, problems) if p)
    changed = sorted(set(expected) | set(proof.written if proof else ()) & set(changes))
    on_purpose = f"; changed on purpose: {', '.join(changed)}" if changed else ""
    if proof is not None and changes:
        on_purpose += " (not hashed again: it changes them)"
    if tables_theirs and not problems:
        on_purpose += f"; {seen.said_theirs(tables_theirs, 'tables.')}"
    return Check(
        name="every ML table is as it was" if rolled_back or not changes
        else "every other ML table is unchanged",
        ok=not problems,
        detail=problems or ("equal" + on_purpose + (f"; {proof.tables_not_read}" if proof else "")),
        remedy=proof.remedy if proof and proof.stray else (seen.remedy if problems else None),
        next_step=None if not problems or (proof and proof.stray) else seen.remedy,
    )


NAMED_CHECK = "rows its blocking anomalies named changed only as their fix says"


def _named_check(conn: Connection, scope: Scope, before: dict[str, dict[str, object]],
                 fixes: tuple[Fix, ...], remedy: str) -> Check:
    """The rows the blocking anomalies named when the milestone started, each compared with
    the row recorded then: unchanged, or changed only as its anomaly's fix prescribes."""
    found = named.compare(conn, scope.named, before, fixes, NAMED_NOUNS)

    def listed(items: list[str]) -> str:
        more = f" and {len(items) - 10} more" if len(items) > 10 else ""
        return "; ".join(items[:10]) + more

    if found.wrong:
        return Check(name=NAMED_CHECK, ok=False, detail=listed(found.wrong), remedy=remedy, next_step=remedy)
    fixed = f"{len(found.fixed)} changed as told: {listed(found.fixed)}; " if found.fixed else ""
    return Check(name=NAMED_CHECK, ok=True, detail=f"{fixed}{found.unchanged} unchanged")


NAMED_NOUNS = {"packages_packages": "package", "ml_candidates": "candidate"}


def _at(differences: list[Difference]) -> str:
    """Where accepted differences lie: at the written keys themselves, one a bucket, or in
    the id ranges holding them."""
    exact = all((d.before or {}).get("bucket_size") == 1 for d in differences)
    return "them" if exact else "the id ranges holding them"


def _declared(now: Fingerprint, milestone: str) -> str:
    """The declared differences of this milestone and later ones (their ledgers say what they
    changed on purpose; the parts compared leave exactly that out)."""
    number = int(milestone.rsplit("-", 1)[-1]) if milestone.rsplit("-", 1)[-1].isdigit() else 0
    return ", ".join(f"{n} {what}" for what, n in sorted(now.declared.items())
                     if int(what.split("milestone-")[1][0]) >= number)


def _to_read_again(scope: Scope | None, changes: tuple[str, ...], compare_tables: bool) -> Scope | None:
    """What of a scoped baseline verify hashes again: not the tables the milestone changes
    on purpose (a difference there is expected; only a rollback must give them back), and
    no table at all once a later milestone changes them (the MLflow view is compared)."""
    if scope is None:
        return None
    if not compare_tables:
        return replace(scope, tables=(), kept={})
    return replace(scope, tables=tuple(t for t in scope.tables if t not in changes))


class _Proof:
    """What the rows a milestone's runs wrote prove about what its baseline did not read."""

    def __init__(self, milestone: str, scope: Scope, written: dict[str, int] | None):
        self.milestone, self.scope, self.written = milestone, scope, written or {}
        self.tracked = written is not None
        declared = set(scope.tables)
        self.stray_tables = {t: n for t, n in self.written.items() if t not in declared}

    @classmethod
    def of(cls, conn: Connection, milestone: str, scope: Scope) -> _Proof:
        return cls(milestone, scope, writes.written_since(conn, milestone, scope.first_run))

    @property
    def remedy(self) -> str:
        return (f"find out what wrote there: `toolkit history` lists the runs of {self.milestone}; "
                "`toolkit fingerprint --compare` against a fingerprint taken before reads everything")

    @property
    def stray(self) -> str:
        if not self.tracked:
            return (f"cannot be proven: a run of {self.milestone} had track_counts off, so PostgreSQL "
                    "did not count the rows it wrote")
        if not self.stray_tables:
            return ""
        listed = ", ".join(f"{t} ({counted(n, 'row')})" for t, n in sorted(self.stray_tables.items()))
        return f"runs of {self.milestone} wrote to tables it must not change: {listed}"

    @property
    def unproven_parts(self) -> str:
        """Parts the baseline did not read that a stray write may have changed."""
        if not self.tracked:
            return self.stray
        # a part read only in part (scope.part_rows) leaves rows unread as well
        touched = [p for p, feeding in PART_TABLES.items()
                   if (p not in self.scope.parts or p in self.scope.part_rows)
                   and set(feeding) & set(self.stray_tables)]
        return f"{', '.join(touched)}: {self.stray}" if touched else ""

    @property
    def parts_not_read(self) -> str:
        skipped = [p for p in PART_TABLES if p not in self.scope.parts]
        return (f"{counted(len(skipped), 'part')} not read again, as no run of {self.milestone} wrote "
                "to their tables "
                f"(pg_stat_xact_user_tables): {', '.join(skipped)}") if skipped else "every part read"

    @property
    def tables_not_read(self) -> str:
        return (f"the other tables not read again: no run of {self.milestone} wrote to them "
                "(PostgreSQL's own counts, pg_stat_xact_user_tables)")
