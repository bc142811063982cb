"""``toolkit fingerprint``: take, save and compare fingerprints of the ML data."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit import milestones as registry
from toolkit.cli import params
from toolkit.cli.context import app
from toolkit.engine import state
from toolkit.engine.plan import Milestone
from toolkit.engine.results import MilestoneState
from toolkit.errors import PreconditionRefused, UsageProblem, VerificationFailed
from toolkit.output import out
from toolkit.schema.migrations import own_schema_exists
from toolkit.timestamps import shown
from toolkit.verify import baselines
from toolkit.verify.differences import Difference, compare
from toolkit.verify.fingerprint import Fingerprint, take
from toolkit.verify.natural_keys import NATURAL_KEYS


@click.command()
@click.option("--out", "out_file", type=params.OUTPUT_FILE,
              help="Write the fingerprint to this JSON file (checked writable before any work).")
@click.option("--compare", "compared", type=params.FINGERPRINT_FILE,
              help="Compare the database with this fingerprint (rows added since do not count); "
                   "exit 1 when anything differs.")
@click.option("--mlflow-only", is_flag=True,
              help="With --compare: compare only what MLflow clients see (milestones change tables "
                   "on purpose).")
@click.option("--baseline", "baseline_of", metavar="MILESTONE",
              help="Re-take the fingerprint MILESTONE's verify compares with, accepting the "
                   "database as it is now (after the application's own updates, say); what "
                   "differs from the one it replaces is listed first.")
def fingerprint(out_file: Path | None, compared: params.FingerprintAt | None, mlflow_only: bool,
                baseline_of: str | None) -> None:
    """Row counts and content hashes of the ML tables and of the MLflow view. Read-only
    unless --baseline.

    Computed in PostgreSQL in one snapshot; nothing is loaded into memory.

    Example: toolkit fingerprint --out before.json; toolkit fingerprint --compare before.json
    """
    _refuse_combinations(out_file, compared, mlflow_only, baseline_of)
    if baseline_of:
        _rebaseline(registry.get(baseline_of))
        return
    reference = compared.fingerprint if compared else None
    compare_file = compared.path if compared else None
    inspector = app().inspector()
    with inspector.read_only() as conn:
        inspector.check_gitlab(conn)
        # rows a sequence numbered (models milestone 3 created) by natural key, unless the
        # file compared with was taken before the toolkit did that (then as it was taken)
        now = take(conn, reference.watermarks if reference else None, reference=reference,
                   natural=reference is None or reference.natural is not None)
    if out_file:
        _write(out_file, now)
        out.say(f"Wrote the fingerprint to {out_file}.")
    _show(now)
    if reference is None:
        app().finish({"fingerprint": now.as_dict()})
        return
    differences = compare(reference, now, tables=not mlflow_only)
    doc = {"fingerprint": now.as_dict(), "compared_with": str(compare_file),
           "differences": [d.describe() for d in differences],
           "natural_keys": _by_natural_key(reference, now)}
    if differences:
        for d in differences:
            out.say(f"  differs: {d.describe()}")
        raise VerificationFailed(
            f"{len(differences)} part(s) differ from {compare_file}: {differences[0].describe()}",
            "a milestone changes some tables on purpose (--mlflow-only compares what users see); "
            "otherwise compare `toolkit history` with what ran since",
            details={"result": doc},
        )
    out.say(f"Equal to {compare_file} (rows added since it was taken are not counted).")
    if natural := _by_natural_key(reference, now):
        out.say("Compared by natural key, as sequence values may differ (a batch rolled back by a "
                "crash, a full disk or a timeout had taken ids): " + "; ".join(natural))
    app().finish(doc)


def _by_natural_key(reference: Fingerprint, now: Fingerprint) -> list[str]:
    """The parts compared by natural key, each with its row count and how."""
    return [f"tables.{table}: {(now.natural or {}).get(table, {}).get('rows', 0)} rows, "
            f"{NATURAL_KEYS[table]}" for table in sorted(reference.natural or {}) if table in NATURAL_KEYS]


def _refuse_combinations(out_file: Path | None, compared: params.FingerprintAt | None,
                         mlflow_only: bool, baseline_of: str | None) -> None:
    """Options that would be silently ignored are refused, before anything connects."""
    if baseline_of and (out_file or compared or mlflow_only):
        given = [name for name, value in (("--out", out_file), ("--compare", compared),
                                          ("--mlflow-only", mlflow_only)) if value]
        raise UsageProblem(f"--baseline takes no {' or '.join(given)}: it re-takes the fingerprint "
                           "a milestone's verify compares with, and writes no file",
                           "run `toolkit fingerprint --out FILE` or `--compare FILE` on its own")
    if mlflow_only and not compared:
        raise UsageProblem("--mlflow-only goes with --compare FILE: it says what to compare",
                           "add --compare FILE, or leave out --mlflow-only")


def _write(path: Path, fp: Fingerprint) -> None:
    """--out was proven writable before the work; a disk that filled since is said in one line."""
    try:
        path.write_text(fp.dumps() + "\n")
    except OSError as exc:
        raise UsageProblem(f"Could not write the fingerprint to {path}: "
                           f"{exc.strerror or type(exc).__name__}",
                           "free space or choose another --out, then run the command again") from None


def _show(fp: Fingerprint) -> None:
    out.say(f"Fingerprint of {fp.database} at {shown(fp.taken_at)}; MLflow view computed from "
            f"{fp.source or 'nothing (ml_experiments and its archive are gone)'}:")
    rows = [[f"table {t}", "absent", ""] if d is None else [f"table {t}", d["rows"], d["hash"][:16]]
            for t, d in fp.tables.items()]
    rows += [[f"table {t} (by natural key: {NATURAL_KEYS[t]})", d["rows"], d["hash"][:16]]
             for t, d in (fp.natural or {}).items()]
    rows += [[f"mlflow {p}", d["rows"], d["hash"][:16]] for p, d in fp.mlflow.items()]
    out.table(["part", "rows", "hash"], rows)


def _rebaseline(milestone: Milestone) -> None:
    engine = app().engine()
    with engine.connect() as conn:
        old = baselines.load(conn, milestone.name) if own_schema_exists(conn) else None
        if old is None:
            raise PreconditionRefused(
                f"{milestone.name} has no fingerprint to re-take: it has not been started",
                f"`toolkit migrate {milestone.name}` takes it when it starts")
    runner = app().runner()
    # A write like any other: under the runner lock and the fenced lease, never beside a run.
    with runner.exclusive(f"toolkit fingerprint --baseline {milestone.name}", milestone.name):
        with runner.inspector.read_only() as conn:
            runner.inspector.check_gitlab(conn)
            now = take(conn, scope=old.scoped)  # what the old one read, read again
            where = state.milestone_state(conn, milestone.name)["state"]
        # what it replaces, shown first (as --compare shows it): what the operator accepts
        differences = [_said(d, milestone) for d in compare(old, now, changes=milestone.changes)]
        differences += _named_differences(old, now)
        for line in differences:
            out.say(f"  differs: {line}")
        with engine.connect() as conn:
            baselines.save(conn, milestone.name, now, old.scoped.first_run if old.scoped else None)
    replaced = (f"{len(differences)} part(s) differed from the one replaced, taken {shown(old.taken_at)}"
                if differences else f"equal to the one replaced, taken {shown(old.taken_at)}")
    out.say(f"Re-took the fingerprint {milestone.name}'s verify compares with ({shown(now.taken_at)}; "
            f"{replaced}).")
    next_step = _after_rebaseline(milestone, where)
    if next_step:
        out.say(next_step)
    app().finish({"milestone": milestone.name, "fingerprint": now.as_dict(),
                  "replaced": {"taken_at": old.taken_at, "differences": differences},
                  "next_step": next_step})


def _said(difference: Difference, milestone: Milestone) -> str:
    own = f" (changed on purpose by {milestone.name})" if difference.expected else ""
    return difference.describe() + own


def _named_differences(old: Fingerprint, now: Fingerprint) -> list[str]:
    """The rows the milestone's blocking anomalies named whose recorded copy changes."""
    found = []
    for table, rows in sorted((old.named_rows or {}).items()):
        noun = baselines.NAMED_NOUNS.get(table, table)
        for key, was in sorted(rows.items(), key=lambda item: int(item[0])):
            row = (now.named_rows or {}).get(table, {}).get(key)
            if row is None:
                found.append(f"named row {noun} {key}: gone")
            elif row != was:
                changed = sorted(c for c in set(was) | set(row) if was.get(c) != row.get(c))
                found.append(f"named row {noun} {key}: {', '.join(changed)}")
    return found


def _after_rebaseline(milestone: Milestone, where: str) -> str:
    """The command that records the milestone as it now is (verify itself writes nothing)."""
    if where in (MilestoneState.APPLIED, MilestoneState.VERIFIED, MilestoneState.IN_PROGRESS):
        yes = " --yes" if milestone.confirm else ""
        return (f"Next: `toolkit migrate {milestone.name}{yes}` verifies it against this fingerprint "
                "and records it verified (it changes only rows still to do); `toolkit verify "
                f"{milestone.name}` checks without recording.")
    if where == MilestoneState.ROLLED_BACK:
        return f"Next: `toolkit rollback {milestone.name}` checks the rollback against this fingerprint."
    return ""
