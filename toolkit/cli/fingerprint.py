"""``toolkit fingerprint``: take, save and compare fingerprints of the ML data."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit import milestones as registry
from toolkit.cli.context import app
from toolkit.engine.plan import Milestone
from toolkit.errors import PreconditionRefused, UsageProblem, VerificationFailed
from toolkit.output import out
from toolkit.schema.migrations import own_schema_exists
from toolkit.timestamps import shown
from toolkit.verify import baselines
from toolkit.verify.fingerprint import Fingerprint, compare, take


@click.command()
@click.option("--out", "out_file", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the fingerprint to this JSON file.")
@click.option("--compare", "compare_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Compare the database with this fingerprint (rows added since do not count); "
                   "exit 1 when anything differs.")
@click.option("--mlflow-only", is_flag=True,
              help="With --compare: compare only what MLflow clients see (milestones change tables "
                   "on purpose).")
@click.option("--baseline", "baseline_of", metavar="MILESTONE",
              help="Re-take the fingerprint MILESTONE's verify compares with, accepting the "
                   "database as it is now (after the application's own updates, say).")
def fingerprint(out_file: Path | None, compare_file: Path | None, mlflow_only: bool,
                baseline_of: str | None) -> None:
    """Row counts and content hashes of the ML tables and of the MLflow view. Read-only
    unless --baseline.

    Computed in PostgreSQL in one snapshot; nothing is loaded into memory.

    Example: toolkit fingerprint --out before.json; toolkit fingerprint --compare before.json
    """
    if baseline_of:
        _rebaseline(registry.get(baseline_of))
        return
    reference = _load(compare_file) if compare_file else None
    runner = app().runner()
    with runner.read_only() as conn:
        runner.check_gitlab(conn)
        now = take(conn, reference.watermarks if reference else None, reference=reference)
    if out_file:
        out_file.write_text(now.dumps() + "\n")
        out.say(f"Wrote the fingerprint to {out_file}.")
    _show(now)
    if reference is None:
        app().finish({"fingerprint": now.as_dict()})
        return
    differences = compare(reference, now, tables=not mlflow_only)
    doc = {"fingerprint": now.as_dict(), "compared_with": str(compare_file),
           "differences": [d.describe() for d in differences]}
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
    app().finish(doc)


def _load(path: Path) -> Fingerprint:
    try:
        return Fingerprint.loads(path.read_text())
    except (ValueError, TypeError) as exc:
        raise UsageProblem(f"{path} is not a toolkit fingerprint ({exc})",
                           "pass a file written by `toolkit fingerprint --out`") from None


def _show(fp: Fingerprint) -> None:
    out.say(f"Fingerprint of {fp.database} at {shown(fp.taken_at)}; MLflow view computed from "
            f"{fp.source or 'nothing (ml_experiments and its archive are gone)'}:")
    rows = [[f"table {t}", "absent", ""] if d is None else [f"table {t}", d["rows"], d["hash"][:16]]
            for t, d in fp.tables.items()]
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
        with runner.read_only() as conn:
            runner.check_gitlab(conn)
            now = take(conn, scope=old.scoped)  # what the old one read, read again
        with engine.connect() as conn:
            baselines.save(conn, milestone.name, now, old.scoped.first_run if old.scoped else None)
    out.say(f"Re-took the fingerprint {milestone.name}'s verify compares with ({shown(now.taken_at)}).")
    app().finish({"milestone": milestone.name, "fingerprint": now.as_dict()})
