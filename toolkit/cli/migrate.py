"""``plan``, ``migrate``, ``verify``, ``rollback``, ``sql``, ``status``, ``history``."""

from __future__ import annotations

import sys
from typing import Any

import click

from toolkit import milestones as registry
from toolkit.cli import params, render, run_report, status_live
from toolkit.cli.context import app
from toolkit.cli.options import observe_options, run_options, runner_for
from toolkit.engine import health, state
from toolkit.engine.locks import runner_lock_holders
from toolkit.engine.plan import Milestone
from toolkit.engine.results import (
    STARTED,
    Check,
    MilestoneState,
    VerifyResult,
)
from toolkit.errors import PreconditionRefused, UsageProblem, VerificationFailed
from toolkit.output import out
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.timestamps import shown

MILESTONE = click.argument("milestone", metavar="MILESTONE")
# The short aliases of the milestones that ask for --yes (the registry's order): "4".
DESTRUCTIVE = ", ".join(str(n) for n, m in enumerate(registry.REGISTRY, start=1) if m.confirm)


@click.command()
@click.argument("milestone", metavar="[MILESTONE]", required=False)
@click.option("--no-sql", is_flag=True,
              help="Leave out the SQL of each step (counts, anomalies and the summary stay; "
                   "--json keeps it).")
@click.option("--fail-on-blocking", is_flag=True,
              help="Exit 1 when a BLOCKING anomaly is found (for a CI gate); the plan is "
                   "printed (or the --json document given) all the same.")
def plan(milestone: str | None, no_sql: bool, fail_on_blocking: bool) -> None:
    """Show what each milestone would change: exact counts, anomalies, SQL. Writes nothing.

    Runs in one READ ONLY, REPEATABLE READ transaction, so the counts are one consistent
    snapshot and nothing can be written, even on a database the toolkit never touched.
    Ends with a summary: rows and BLOCKING anomalies per milestone.

    Example: toolkit plan milestone-1 --no-sql --fail-on-blocking
    """
    chosen = [registry.get(milestone)] if milestone else list(registry.MILESTONES.values())
    inspector = app().inspector()
    results = [inspector.plan(m) for m in chosen]
    for result in results:
        render.plan(result, show_sql=not no_sql)
    readings = health.readings_now(inspector.engine, ML_TABLE_NAMES)
    out.say("Database health now (a run waits while one is over its limit; default limits):")
    for reading in readings:
        state_word = "OVER" if reading.over else "ok" if reading.readable else "unreadable"
        out.say(f"  {reading.signal.replace('_', ' ')}: {state_word}: {reading.detail}")
    summary = run_report.plan_summary(results)
    run_report.say_plan_summary(summary)
    doc = {"dry_run": True, "milestones": [run_report.plan_doc(r) for r in results],
           "health": [r.as_dict() for r in readings], "summary": summary}
    if fail_on_blocking and summary["blocking"]:
        blocked = ", ".join(f"{m['milestone']} {m['blocking']}" for m in summary["milestones"]
                            if m["blocking"])
        raise VerificationFailed(
            f"BLOCKING anomalies found ({blocked} rows); --fail-on-blocking fails the plan",
            "resolve each as the plan's \"what to do\" says (docs/blueprint.md), then run the plan again",
            details={"result": doc})
    app().finish(doc)


@click.command()
@MILESTONE
@click.option("--dry-run", is_flag=True, help="Show what would happen (as `plan`) and write nothing.")
@click.option("--no-verify", is_flag=True, help="Do not verify after applying.")
@click.option("--yes", is_flag=True,
              help=f"Confirm a destructive milestone ({DESTRUCTIVE}) without the prompt.")
@run_options("migrate")
@observe_options
def migrate(milestone: str, dry_run: bool, no_verify: bool, yes: bool, **opts: Any) -> None:
    """Apply a milestone in short batches; resumable, one runner at a time.

    Refuses to start until the previous milestone verifies. Ctrl-C stops at the next
    batch boundary; running the same command again resumes (it says where, and does not
    walk the passes finished before). Verifies at the end.

    With --hold-before-drop (or --hold-flag-file PATH), milestone 4 stops after its row-for-row
    check, before anything is dropped, until `toolkit control unpostpone` (or PATH is gone).

    Example: toolkit migrate milestone-1 --dry-run
    """
    chosen = registry.get(milestone)
    if (opts["hold_before_drop"] or opts["hold_flag_file"]) and chosen.hold_point is None:
        holding = " and ".join(f"{m.name}'s" for m in registry.REGISTRY if m.hold_point is not None)
        raise UsageProblem(f"{chosen.name} drops nothing: --hold-before-drop and --hold-flag-file "
                           f"hold before {holding} drops only",
                           f"run `toolkit migrate {chosen.name}` without them")
    runner = runner_for(opts)
    if dry_run:
        result = runner.inspector.plan(chosen)
        render.plan(result)
        if not result.gate.ok:
            raise result.gate.refusal(chosen)
        out.say("Dry run: nothing was written.")
        app().finish({"dry_run": True, "milestones": [run_report.plan_doc(result)]})
        return
    final, now = runner.inspector.final(chosen)
    if final is not None and now in (MilestoneState.VERIFIED, MilestoneState.APPLIED):
        # Nothing to apply, nothing to confirm: say so and write nothing. (Applied and final:
        # declared in place by `toolkit adopt` after the toolkit's schema was lost.)
        out.say(f"{chosen.name} is already {now}, and final: {final.why}. Nothing to apply; "
                f"`toolkit verify {chosen.name}` checks it again.")
        app().finish({"milestone": chosen.name, "state": now, "already": True, "final": final.as_dict()})
        return

    def go_ahead() -> None:
        if chosen.confirm and not yes:
            _confirm_destructive(chosen)
        app().go_ahead(chosen.name, "migrate")
        out.say(f"Applying {chosen.name}: {chosen.title}")

    applied = runner.migrate(chosen, verify_after=not no_verify, go_ahead=go_ahead,
                             on_pass=run_report.say_pass)
    run_report.report_apply(applied)
    if applied.verify is not None and not applied.verify.ok:
        failure = applied.verify.failure()
        failure.details = {"result": run_report.apply_doc(applied)}
        raise failure
    app().finish(run_report.apply_doc(applied))


def _confirm_destructive(chosen: Milestone) -> None:
    """Type the database's name, as GitHub asks for a repository's before deleting it."""
    database = app().target().url.database or ""
    next_step = f"pass --yes (for CI), or run it in a terminal and type {database!r}"
    if app().json_mode:  # a terminal or not: --json's stdout is one document, never a prompt
        raise PreconditionRefused(
            f"{chosen.name} drops tables and needs confirmation, which --json cannot ask for "
            "(its output is one JSON document, never a prompt)",
            f"pass --yes with --json, or run it without --json and type {database!r}",
            details={"confirmation": "--yes", "why": "--json cannot prompt"})
    if not sys.stdin.isatty():
        raise PreconditionRefused(
            f"{chosen.name} drops tables and needs confirmation, and its input is not a terminal "
            "to type it in", next_step)
    out.say(f"{chosen.name} will archive these (in schema toolkit), check them row for row, then drop:")
    for step in app().inspector().plan(chosen).steps:
        for what, rows in step.breakdown.items():
            out.say(f"  {what.replace(' to archive', '')}: {rows}")
    try:
        typed = click.prompt(f"{chosen.name} archives and then DROPS tables in {database!r}. "
                             "Type the database name to go on", default="", show_default=False)
    except click.Abort:  # Ctrl-C or Ctrl-D at the prompt: Click's "Aborted!" and exit 1 otherwise
        raise PreconditionRefused("Not confirmed: the prompt was left without the database's name",
                                  next_step) from None
    if typed.strip() != database:
        raise PreconditionRefused("Not confirmed: the name typed is not the database's", next_step)


@click.command()
@click.argument("milestone", metavar="[MILESTONE]", required=False)
@click.option("--require", type=click.Choice(["applied", "verified"]),
              help="For a CI gate: also fail (exit 1) unless the milestone is applied (its run "
                   "finished: applied or verified), or recorded verified by migrate; without "
                   "MILESTONE, every milestone must be. Bare verify passes where nothing was applied.")
def verify(milestone: str | None, require: str | None) -> None:
    """Check a milestone's post-conditions; exit 1 when one fails. Read-only.

    Without MILESTONE, every milestone that has been applied (or is under way) is checked;
    one never started, or rolled back, is listed as such and not checked (with --require,
    it fails the requirement instead).

    Example: toolkit verify milestone-1 --require verified --json
    """
    inspector = app().inspector()
    states = inspector.states() if require or not milestone else {}
    if milestone:
        chosen, skipped = [registry.get(milestone)], {}
    else:
        chosen = [m for m in registry.MILESTONES.values() if states[m.name] in STARTED]
        skipped = {name: where for name, where in states.items() if where not in STARTED}
    results = inspector.verify_many(chosen)
    if require:
        # every milestone is then held to the requirement: one never started fails it too
        results += [VerifyResult(registry.get(name), []) for name in skipped]
        skipped = {}
        order = list(registry.MILESTONES)
        results.sort(key=lambda r: order.index(r.milestone.name))
        for result in results:
            name = result.milestone.name
            result.checks.insert(0, _required(registry.get(name), states[name], require))
    by_name = {r.milestone.name: r for r in results}
    for name in registry.MILESTONES if not milestone else [chosen[0].name]:
        if name in skipped:
            out.say(f"{name}: {skipped[name].replace('_', ' ')} (not checked)")
            continue
        result = by_name[name]
        out.say(f"{name}: {'verifies' if result.ok else 'does NOT verify'}")
        render.checks(result.checks)
    docs = [{"milestone": r.milestone.name, "ok": r.ok, "checks": [c.as_dict() for c in r.checks]}
            for r in results]
    docs += [{"milestone": name, "ok": None, "state": where, "checks": []}
             for name, where in skipped.items()]
    failed = [r for r in results if not r.ok]
    if failed:
        failure = failed[0].failure()
        failure.details = {"result": {"milestones": docs}}
        raise failure
    app().finish({"milestones": docs})


def _required(milestone: Milestone, where: MilestoneState, require: str) -> Check:
    """``verify --require``: the milestone's recorded state, and the command that moves it on."""
    ok = (where == MilestoneState.VERIFIED if require == "verified"
          else where in (MilestoneState.APPLIED, MilestoneState.VERIFIED))
    migrate = f"`toolkit migrate {milestone.name}{' --yes' if milestone.confirm else ''}`"
    remedy = None if ok else {
        MilestoneState.NOT_STARTED: f"{migrate} applies it" + (
            " (the milestones before it first, in order)" if registry.previous(milestone) else ""),
        MilestoneState.ROLLED_BACK: f"{migrate} applies it again",
        MilestoneState.IN_PROGRESS: f"{migrate} finishes the run that stopped (`toolkit status` shows where)",
        MilestoneState.ROLLING_BACK: f"`toolkit rollback {milestone.name}` finishes the rollback that "
                                     f"stopped, then {migrate} applies it again",
        MilestoneState.APPLIED: f"{migrate} verifies it again and records it verified (`toolkit verify "
                                f"{milestone.name}` lists what fails, if anything)",
    }.get(where, migrate)
    recorded = f"recorded {where.replace('_', ' ')}" if where != MilestoneState.NOT_STARTED else where
    return Check(name=f"{milestone.name} is {require} (--require {require})", ok=ok, detail=recorded,
                 remedy=remedy, next_step=remedy)


@click.command()
@MILESTONE
@click.option("--dry-run", is_flag=True,
              help="Count what the rollback would restore and remove, pass by pass, from the "
                   "ledgers and the archive; in one READ ONLY transaction, writing nothing. "
                   "Refused (exit 3) where the rollback would be.")
@run_options("rollback")
@observe_options
def rollback(milestone: str, dry_run: bool, **opts: Any) -> None:
    """Undo a milestone exactly, from its ledger; later milestones must be rolled back first.

    Example: toolkit rollback milestone-1 --dry-run

    Example: toolkit rollback milestone-1
    """
    chosen = registry.get(milestone)
    if dry_run:
        undo = app().inspector().rollback_plan(chosen)
        render.undo_plan(undo)
        out.say(f"{chosen.name}: {run_report.count(undo.rows, 'row')} and "
                f"{run_report.count(undo.schema_changes, 'schema change')} to undo. "
                "Dry run: nothing was written.")
        app().finish({"dry_run": True, **undo.as_dict()})
        return

    def go_ahead() -> None:
        app().go_ahead(chosen.name, "rollback")
        out.say(f"Rolling back {chosen.name}: {chosen.title}")

    result, checks = runner_for(opts).rollback(
        chosen, go_ahead=go_ahead, on_pass=lambda p: run_report.say_pass(p, undoing=True))
    run_report.report_apply(result)
    render.checks(checks)
    doc = {**run_report.apply_doc(result), "checks": [c.as_dict() for c in checks]}
    failed = [c for c in checks if not c.ok]
    if failed:
        raise VerificationFailed(f"{chosen.name} rollback incomplete: {failed[0].detail}",
                                 failed[0].remedy, details={"result": doc})
    app().finish(doc)


@click.command()
@status_live.watch_options
def status(watch_s: float | None, frames: int | None) -> None:
    """Where each milestone stands, and what is left to do, in rows; and the run going now,
    from any host: its pass, keys done of total, rate, time left, waits, last batch, who
    steered it. Read-only.

    Example: toolkit status

    Example: toolkit status --watch 5
    """
    inspector = app().inspector()
    report = inspector.status()
    now = status_live.read_now(inspector)
    rows = []
    for entry in report:
        left = sum(entry["remaining"].values())
        progress = [cp for cp in entry["checkpoints"] if cp["completed_at"] is None]
        where = ", ".join(f"{cp['step']} after key {cp['last_key']} ({cp['rows_done']} rows)"
                          for cp in progress)
        rows.append([entry["milestone"], entry["state"].replace("_", " "), left,
                     entry["schema_changes_left"], where or "-"])
    out.table(["milestone", "state", "rows left", "schema changes left", "checkpoint"], rows)
    for entry in report:
        if entry["final"]:
            again = "" if entry["state"] == MilestoneState.VERIFIED else (
                f" Run `toolkit migrate {entry['milestone']}"
                f"{' --yes' if registry.get(entry['milestone']).confirm else ''}` to verify it and "
                "record it verified again.")
            out.say(f"{entry['milestone']} is final: {entry['final']['why']}; it cannot be rolled "
                    f"back.{again}")
        if entry["state"] == MilestoneState.APPLIED and not entry["final"]:
            name = entry["milestone"]
            yes = " --yes" if registry.get(name).confirm else ""
            out.say(f"{name} is applied but not recorded verified: `toolkit verify {name}` lists what "
                    f"fails, if anything; `toolkit migrate {name}{yes}` verifies it again and records "
                    "it verified.")
        if entry["left_to_undo"]:
            out.say(f"{entry['milestone']} is rolling back (interrupted?); left to undo: "
                    + "; ".join(entry["left_to_undo"])
                    + f". Run `toolkit rollback {entry['milestone']}` to finish it.")
    status_live.say_run(now["run"])
    status_live.say_pause_and_hold(now)
    result = {"milestones": report, **status_live.as_json(now)}
    if watch_s is None:
        app().finish(result)
        return
    if app().json_mode:  # a stream of one-line documents, the first of them this one
        status_live.json_first(result)
    status_live.watch(inspector, watch_s, frames, now)


def _took(run: dict) -> str:
    if run["finished_at"] is None:
        return "-"
    return f"{(run['finished_at'] - run['started_at']).total_seconds():.1f}s"


@click.command()
@click.option("--limit", type=params.ROWS, default=20, show_default=True)
def history(limit: int) -> None:
    """Who ran what, when, how many rows, and how it ended.

    Example: toolkit history --limit 5
    """
    inspector = app().inspector()
    with inspector.engine.connect() as conn:
        inspector.check_gitlab(conn, columns=False)
        runs = state.history(conn, limit)
        somebody_running = bool(runner_lock_holders(conn))
    # A run killed outright (kill -9, a lost host) never recorded how it ended. Only the
    # newest unfinished run can still be going, and only while a runner holds the lock.
    unfinished = [r["id"] for r in runs if r["outcome"] == "running"]
    live = max(unfinished) if unfinished and somebody_running else None
    for r in runs:
        if r["outcome"] == "running" and r["id"] != live:
            r["outcome"] = "stopped unrecorded"
            last = r.get("last_batch_at")
            when = f"; its last commit was at {shown(last)}" if last else ""
            r["error"] = r["error"] or (f"ended without recording how (killed, or its connection "
                                        f"lost){when}; run the same command again")
    for r in runs:  # WAL its batches wrote (runs.wal_bytes_by_step; absent before revision 0011)
        r["wal_bytes"] = sum((r.get("wal_bytes_by_step") or {}).values())
    out.table(
        ["id", "started", "took", "command", "user", "outcome", "rows", "WAL"],
        [[r["id"], shown(r["started_at"]), _took(r), r["command"],
          f"{r['os_user']}@{r['host']} as {r['database_user']}", r["outcome"],
          sum((r["rows_by_step"] or {}).values()),
          status_live.size_text(r["wal_bytes"]) if r["wal_bytes"] else "-"] for r in runs],
    )
    for r in runs:
        if r["error"]:
            out.say(f"run {r['id']}: {r['error']}")
        if len(r.get("wal_bytes_by_step") or {}) > 1:  # by pass, with the rows it changed
            out.say(f"run {r['id']} WAL by pass: " + "; ".join(
                f"{step} {status_live.size_text(wal)}" + status_live.per_row(wal, r["rows_by_step"].get(step))
                for step, wal in r["wal_bytes_by_step"].items()))
        if controls := (r.get("options") or {}).get("controls"):  # `toolkit control` it took
            out.say(f"run {r['id']} was steered: " + "; ".join(
                f"{c['action']}{' ' + c['key'] + '=' + c['value'] if c.get('key') else ''} by "
                f"{c['db_user']} ({c['os_user']}@{c['host']})"
                + (f": {c['reason']}" if c.get("reason") else "") for c in controls))
    if not runs:
        out.say("No runs recorded yet.")
    app().finish({"runs": runs})
