"""``plan``, ``migrate``, ``verify``, ``rollback``, ``sql``, ``status``, ``history``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from toolkit import milestones as registry
from toolkit.cli import params, render, status_live
from toolkit.cli.context import app
from toolkit.engine import health, state
from toolkit.engine.batches import PassResult, RunOptions
from toolkit.engine.locks import runner_lock_holders
from toolkit.engine.outcomes import ApplyResult, PlanResult, VerifyResult
from toolkit.engine.plan import Milestone
from toolkit.engine.results import Check
from toolkit.engine.runner import Runner
from toolkit.errors import PreconditionRefused, UsageProblem, VerificationFailed
from toolkit.output import out
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.timestamps import shown

MILESTONE = click.argument("milestone", metavar="MILESTONE")
# A second: a batch's row locks keep GitLab's updates of those rows waiting at most that
# long (inserts never wait), and a batch's fixed cost stays a few percent. Half a second
# cost milestone 3 a quarter of its throughput at x25: each batch of experiments rewrites
# pages all over ml_candidates, whose rows are not stored by experiment.
DEFAULT_TARGET_BATCH_MS = 1000


def batch_target(batch_size: int | None, target_batch_ms: int | None) -> int | None:
    """An operator who names a batch size gets exactly that size; one who names neither
    gets batches sized to the default time budget."""
    if target_batch_ms is None:
        return None if batch_size is not None else DEFAULT_TARGET_BATCH_MS
    return target_batch_ms or None


def run_options(func: Callable) -> Callable:
    """Options every writing command shares."""
    options = [
        click.option("--batch-size", type=params.BATCH_SIZE, default=None,
                     help="Keys of the driving table per batch (one short transaction each). "
                          "Given, every batch has this size (unless --target-batch-ms is given "
                          "too); without it, batches start at 1000 keys and adapt.  [default: "
                          "adaptive]"),
        click.option("--target-batch-ms", type=params.DURATION_MS, default=None,
                     help="Resize batches (x0.5 to x2 each time, 100 to 50000 keys) so each "
                          f"takes about this long; 0 keeps the size fixed.  [default: "
                          f"{DEFAULT_TARGET_BATCH_MS} without --batch-size]"),
        click.option("--pause-ms", type=params.DURATION_MS, default=0, show_default=True,
                     help="Pause between batches, to leave room for GitLab's own traffic."),
        click.option("--max-batches", type=params.BATCHES, default=None,
                     help="Do this many batches now, then stop; the next run resumes."),
        click.option("--max-runtime", type=params.SECONDS, default=None, metavar="SECONDS",
                     help="Stop at the first batch boundary after this long; the next run resumes."),
        click.option("--lock-timeout-ms", type=params.TIMEOUT_MS, default=2000, show_default=True,
                     help="Longest a statement waits for a lock before the batch is retried."),
        click.option("--statement-timeout-ms", type=params.TIMEOUT_MS, default=60_000,
                     show_default=True, help="Longest a single statement may run."),
        click.option("--retries", type=params.TRIES, default=5, show_default=True,
                     help="Retries of a batch after a lock or statement timeout (with backoff)."),
        click.option("--ddl-lock-timeout-ms", type=params.TIMEOUT_MS, default=100, show_default=True,
                     help="Longest a schema change waits for its lock (GitLab's queries queue "
                          "behind it meanwhile), before it is retried."),
        click.option("--ddl-retries", type=params.TRIES, default=20, show_default=True,
                     help="Retries of a schema change after a lock timeout (backoff up to 5 s)."),
        click.option("--lock-wait", type=params.SECONDS, default=10.0, show_default=True,
                     metavar="SECONDS", help="How long to poll for the one-runner lock; then exit 7 "
                                             "(busy) if another run still holds it."),
        click.option("--reconnect", type=params.TRIES, default=0, show_default=True, metavar="N",
                     help="When the database ends the session (restart, failover, a terminated "
                          "session, idle_session_timeout), resume by itself up to N times, "
                          "waiting 1 s, 2 s, 4 s ... (at most 30 s) and connecting to whichever "
                          "host is the primary. Without it such a run stops with exit code 75."),
        click.option("--max-replica-lag-ms", type=params.DURATION_MS, metavar="MS",
                     default=health.DEFAULT_MAX_REPLICA_LAG_MS, show_default=True,
                     help="Before each batch and schema change, wait while a streaming replica "
                          "(pg_stat_replication) is this far behind in replay_lag. A replica "
                          "attached but not replaying counts as lagging."),
        click.option("--max-replica-lag-bytes", type=params.BYTES, metavar="BYTES",
                     default=health.DEFAULT_MAX_REPLICA_LAG_BYTES, show_default=True,
                     help="Wait too while a replica has more than this many bytes of WAL not yet "
                          "replayed (replay_lag stays small while replay is paused; bytes do not)."),
        click.option("--max-transaction-age-s", type=params.SECONDS, metavar="SECONDS",
                     default=health.DEFAULT_MAX_TRANSACTION_AGE_S, show_default=True,
                     help="Wait while another session of this database has a transaction open "
                          "longer than this (it keeps VACUUM from removing what batches leave). "
                          "Waits too during a VACUUM of a table the batch writes, and while WAL "
                          "archiving has failed since the run started."),
        click.option("--max-archive-backlog", type=params.SEGMENTS, metavar="SEGMENTS",
                     default=health.DEFAULT_MAX_ARCHIVE_BACKLOG, show_default=True,
                     help="Wait while more WAL segments wait to be archived than when the run "
                          "started, by more than this (the archiver falling behind)."),
        click.option("--max-wal-rate", "max_wal_rate_mb_s", type=params.WAL_RATE, metavar="MB/S",
                     default=None,
                     help="Wait while the primary writes WAL faster than this many MB/s over the "
                          "last 5 s (pg_current_wal_insert_lsn; every session's WAL counts, as "
                          "it does for replicas, archiving and DR). 1 MB = 1048576 bytes.  "
                          "[default: no limit]"),
        click.option("--throttle-query", type=params.SQL_QUERY, metavar="SQL", default=None,
                     help="Your own check, run before each batch: wait while it returns true.  "
                          "[default: none]"),
        click.option("--throttle-flag-file", type=params.FLAG_FILE, metavar="PATH", default=None,
                     help="Wait while this file exists (create it to pause a run, remove it to "
                          "go on).  [default: none]"),
        click.option("--no-throttle", is_flag=True, default=False,
                     help="Do not read the database's health nor wait on it."),
        click.option("--max-throttle-s", type=params.SECONDS, default=None, metavar="SECONDS",
                     help="Wait at most this long in all on the database's health, then stop at "
                          "the batch boundary with exit code 6; the same command resumes.  "
                          "[default: no limit]"),
        click.option("--resume-with-this-version", is_flag=True, default=False,
                     help="Resume an unfinished milestone even though another toolkit version "
                          "(or other options that change what is written) started it; without "
                          "it such a resume is refused with exit code 3."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _set_app(attribute: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _: click.Parameter, value: Any) -> None:
        if value is not None:
            setattr(app(ctx), attribute, value)
    return callback


def observe_options(func: Callable) -> Callable:
    """Where a run is told besides the terminal (cli/observe.py; docs/operations.md)."""
    options = [
        click.option("--events", type=params.EVENTS_FILE, default=None, metavar="FILE",
                     expose_value=False, callback=_set_app("events_path"),
                     help="Append one JSON object per line to FILE ('-': stderr) for the run's "
                          "start, phases, batches, throttle waits, retries, schema changes and "
                          "end, each flushed as it happens (fields: docs/operations.md)."),
        click.option("--metrics-textfile", type=params.METRICS_FILE, default=None, metavar="PATH",
                     expose_value=False, callback=_set_app("metrics_path"),
                     help="Rewrite PATH (atomically) after every batch with Prometheus metrics "
                          "named as GitLab's batched migrations', for node_exporter's textfile "
                          "collector: give it a name ending in .prom in the collector's "
                          "directory (docs/operations.md)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _runner(opts: dict[str, Any] | None = None) -> Runner:
    opts = dict(opts or {})
    lock_wait = opts.pop("lock_wait", 10.0)
    if "batch_size" in opts:
        opts["target_batch_ms"] = batch_target(opts["batch_size"], opts["target_batch_ms"])
        opts["batch_size"] = opts["batch_size"] or RunOptions.batch_size
    if "max_runtime" in opts:
        opts["max_runtime_s"] = opts.pop("max_runtime")
    options = RunOptions(**opts)
    return app().runner(options, command=_command_line(), lock_wait_s=lock_wait)


def _command_line() -> str:
    """The command as typed, less defaults (recorded in history; never holds the URL)."""
    ctx = click.get_current_context()
    words = ["toolkit", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words.append(str(value)) if value is not None else None
        elif value != param.default and value not in (None, False):
            words.append(param.opts[0] if value is True else f"{param.opts[0]}={value}")
    return " ".join(words)


def _seconds(took: float) -> str:
    return f"{took:.2f} s" if took < 10 else f"{took:.1f} s"


def _count(n: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{n} {noun if n == 1 else plural}"


def _size_range(sizes: list[int]) -> dict[str, int] | None:
    if not sizes:
        return None
    return {"first": sizes[0], "last": sizes[-1], "smallest": min(sizes), "largest": max(sizes)}


def _plan_doc(result: PlanResult) -> dict[str, Any]:
    return {"milestone": result.milestone.name, "title": result.milestone.title, "rows": result.rows,
            "gate": result.gate.as_dict(), "steps": [s.as_dict() for s in result.steps]}


def _apply_doc(result: ApplyResult) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "milestone": result.milestone.name, "run_id": result.run_id, "complete": result.complete,
        "stopped": result.stopped, "rows": result.rows,
        "seconds": round(result.seconds, 3),
        "timings": {phase: round(took, 3) for phase, took in result.timings.items()},
        "throttled_seconds": result.throttled_seconds,
        "passes": [{"name": p.name, "rows": p.rows, "batches": p.batches, "complete": p.complete,
                    "schema_change": p.schema_change, "changed": p.changed,
                    "finished_before": p.finished_before is not None,
                    "seconds": round(p.seconds, 3), "batch_sizes": _size_range(p.batch_sizes),
                    "wal_bytes": p.wal_bytes}
                   for p in result.passes],
    }
    if result.verify is not None:
        doc["verify"] = {"ok": result.verify.ok, "checks": [c.as_dict() for c in result.verify.checks]}
    return doc


def _plan_summary(results: list[PlanResult]) -> dict[str, Any]:
    """The plan's closing numbers. Each row is counted in the one milestone that changes it
    (milestone 3 does not count again the candidates milestone 2 sets), so the total is
    the sum of the milestones' rows."""
    return {"rows": sum(r.rows for r in results),
            "blocking": sum(r.blocking for r in results),
            "warnings": sum(r.warnings for r in results),
            "milestones": [{"milestone": r.milestone.name, "rows": r.rows, "blocking": r.blocking,
                            "warnings": r.warnings, "gate_open": r.gate.ok,
                            "waits_for": None if r.gate.ok else r.gate.previous} for r in results]}


def _say_summary(summary: dict[str, Any]) -> None:
    out.say("Summary (each row counted once, in the milestone that changes it):")
    rows = [[m["milestone"], m["rows"], m["blocking"], m["warnings"],
             "open" if m["gate_open"] else f"waits for {m['waits_for'] or 'its preconditions'}"]
            for m in summary["milestones"]]
    if len(rows) > 1:
        rows.append(["total", summary["rows"], summary["blocking"], summary["warnings"], ""])
    out.table(["milestone", "rows", "BLOCKING", "warnings", "gate"], rows)


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
    runner = _runner()
    results = [runner.plan(m) for m in chosen]
    for result in results:
        render.plan(result, show_sql=not no_sql)
    readings = health.readings_now(runner.engine, ML_TABLE_NAMES)
    out.say("Database health now (a run waits while one is over its limit; default limits):")
    for reading in readings:
        state_word = "OVER" if reading.over else "ok" if reading.readable else "unreadable"
        out.say(f"  {reading.signal.replace('_', ' ')}: {state_word}: {reading.detail}")
    summary = _plan_summary(results)
    _say_summary(summary)
    doc = {"dry_run": True, "milestones": [_plan_doc(r) for r in results],
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
@click.option("--yes", is_flag=True, help="Confirm a destructive milestone (4) without the prompt.")
@click.option("--hold-before-drop", is_flag=True, default=False,
              help="milestone-4: archive and check row for row, then wait before the first drop "
                   "(holding only the runner lock) until `toolkit control unpostpone`.")
@click.option("--hold-flag-file", type=params.FLAG_FILE, metavar="PATH", default=None,
              help="milestone-4: as --hold-before-drop, and also go on once PATH does not exist.")
@run_options
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
        raise UsageProblem(f"{chosen.name} drops nothing: --hold-before-drop and --hold-flag-file "
                           "hold before milestone-4's drops only",
                           f"run `toolkit migrate {chosen.name}` without them")
    runner = _runner(opts)
    if dry_run:
        result = runner.plan(chosen)
        render.plan(result)
        if not result.gate.ok:
            raise result.gate.refusal(chosen)
        out.say("Dry run: nothing was written.")
        app().finish({"dry_run": True, "milestones": [_plan_doc(result)]})
        return
    final, now = runner.final(chosen)
    if final is not None and now in (state.VERIFIED, state.APPLIED):
        # Nothing to apply, nothing to confirm: say so and write nothing. (Applied and final:
        # declared in place by `toolkit adopt` after the toolkit's schema was lost.)
        out.say(f"{chosen.name} is already {now}, and final: {final.why}. Nothing to apply; "
                f"`toolkit verify {chosen.name}` checks it again.")
        app().finish({"milestone": chosen.name, "state": now, "already": True, "final": final.as_dict()})
        return

    def go_ahead() -> None:
        if chosen.confirm and not yes:
            _confirm_destructive(chosen)
        out.say(f"Applying {chosen.name}: {chosen.title}")

    applied = runner.migrate(chosen, verify_after=not no_verify, go_ahead=go_ahead, on_pass=_say_pass)
    _report_apply(applied)
    if applied.verify is not None and not applied.verify.ok:
        failure = applied.verify.failure()
        failure.details = {"result": _apply_doc(applied)}
        raise failure
    app().finish(_apply_doc(applied))


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
    for step in _runner().plan(chosen).steps:
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


def _say_pass(p: PassResult, *, undoing: bool = False) -> None:
    """One line for a pass or schema change, said as soon as it ends (the runner's
    ``on_pass``): a run stopped later has shown what it finished."""
    done, nothing_to_do = ("schema change undone", "already undone") if undoing else \
        ("schema changed", "already in place")
    verb = "restored" if undoing else "changed"
    took = f" ({_seconds(p.seconds)})"
    if p.finished_before is not None:
        out.say(f"  {p.name}: finished before ({_count(p.finished_before, 'row')} {verb}); "
                "not walked again")
    elif p.outcome is not None:
        out.say(f"  {p.name}: {p.outcome if p.changed else 'done before'}{took}")
    elif not p.complete:
        out.say(f"  {p.name}: stopped ({p.stopped}) after {_count(p.rows, 'row')} in "
                f"{_count(p.batches, 'batch')}{took}")
    elif p.schema_change:
        out.say(f"  {p.name}: {done if p.changed else nothing_to_do}{took}")
    else:
        sizes = _size_range(p.batch_sizes)
        spread = (f" of {sizes['smallest']} to {sizes['largest']} keys"
                  if sizes and sizes["smallest"] != sizes["largest"] else "")
        out.say(f"  {p.name}: {_count(p.rows, 'row')} {verb} in {_count(p.batches, 'batch')}"
                f"{spread}{took}")


def _report_apply(result: ApplyResult) -> None:
    """The run's closing lines (each pass has had its own as it ended: ``_say_pass``)."""
    if not result.complete:
        out.say(f"Stopped early ({result.stopped}); run the same command again to continue.")
    if result.throttled_seconds:
        waited = ", ".join(f"{signal.replace('_', ' ')} {_seconds(took)}"
                           for signal, took in result.throttled_seconds.items())
        out.say(f"Waited on the database's health: {waited}")
    phases = ", ".join(f"{phase} {_seconds(took)}" for phase, took in result.timings.items())
    schema = sum(1 for p in result.passes if p.schema_change and p.changed)
    out.say(f"{result.milestone.name}: {_count(result.rows, 'row')} and "
            f"{_count(schema, 'schema change')} in {_seconds(result.seconds)} ({phases})")
    if result.verify is not None:
        out.say(f"Verify {result.milestone.name}:")
        render.checks(result.verify.checks)


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
    runner = _runner()
    states = runner.states() if require or not milestone else {}
    if milestone:
        chosen, skipped = [registry.get(milestone)], {}
    else:
        chosen = [m for m in registry.MILESTONES.values() if states[m.name] in state.STARTED]
        skipped = {name: where for name, where in states.items() if where not in state.STARTED}
    results = runner.verify_many(chosen)
    if require:
        # every milestone is then held to the requirement: one never started fails it too
        results += [VerifyResult(registry.get(name), []) for name in skipped]
        skipped = {}
        order = list(registry.MILESTONES)
        results.sort(key=lambda r: order.index(r.milestone.name))
        for result in results:
            result.checks.insert(0, _required(result.milestone, states[result.milestone.name], require))
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


def _required(milestone: Milestone, where: str, require: str) -> Check:
    """``verify --require``: the milestone's recorded state, and the command that moves it on."""
    ok = where == state.VERIFIED if require == "verified" else where in (state.APPLIED, state.VERIFIED)
    migrate = f"`toolkit migrate {milestone.name}{' --yes' if milestone.confirm else ''}`"
    remedy = None if ok else {
        state.NOT_STARTED: f"{migrate} applies it" + (" (the milestones before it first, in order)"
                                                       if milestone.number > 1 else ""),
        state.ROLLED_BACK: f"{migrate} applies it again",
        state.IN_PROGRESS: f"{migrate} finishes the run that stopped (`toolkit status` shows where)",
        state.ROLLING_BACK: f"`toolkit rollback {milestone.name}` finishes the rollback that stopped, "
                            f"then {migrate} applies it again",
        state.APPLIED: f"{migrate} verifies it again and records it verified (`toolkit verify "
                       f"{milestone.name}` lists what fails, if anything)",
    }.get(where, migrate)
    return Check(name=f"{milestone.name} is {require} (--require {require})", ok=ok,
                 detail=f"recorded {where.replace('_', ' ')}" if where != state.NOT_STARTED else where,
                 remedy=remedy, next_step=remedy)


@click.command()
@MILESTONE
@click.option("--dry-run", is_flag=True,
              help="Count what the rollback would restore and remove, pass by pass, from the "
                   "ledgers and the archive; in one READ ONLY transaction, writing nothing. "
                   "Refused (exit 3) where the rollback would be.")
@run_options
@observe_options
def rollback(milestone: str, dry_run: bool, **opts: Any) -> None:
    """Undo a milestone exactly, from its ledger; later milestones must be rolled back first.

    Example: toolkit rollback milestone-1 --dry-run

    Example: toolkit rollback milestone-1
    """
    chosen = registry.get(milestone)
    if dry_run:
        undo = _runner(opts).rollback_plan(chosen)
        render.undo_plan(undo)
        out.say(f"{chosen.name}: {_count(undo.rows, 'row')} and "
                f"{_count(undo.schema_changes, 'schema change')} to undo. Dry run: nothing was written.")
        app().finish({"dry_run": True, **undo.as_dict()})
        return
    result, checks = _runner(opts).rollback(
        chosen, go_ahead=lambda: out.say(f"Rolling back {chosen.name}: {chosen.title}"),
        on_pass=lambda p: _say_pass(p, undoing=True))
    _report_apply(result)
    render.checks(checks)
    doc = {**_apply_doc(result), "checks": [c.as_dict() for c in checks]}
    failed = [c for c in checks if not c.ok]
    if failed:
        raise VerificationFailed(f"{chosen.name} rollback incomplete: {failed[0].detail}",
                                 failed[0].remedy, details={"result": doc})
    app().finish(doc)


@click.command()
@click.option("--watch", "watch_s", type=status_live.WATCH_S, is_flag=False,
              flag_value=status_live.DEFAULT_WATCH_S, default=None, metavar="[SECONDS]",
              help="Then show the running run again every SECONDS (default "
                   f"{status_live.DEFAULT_WATCH_S:g}) until it ends, or Ctrl-C; with no run going, "
                   "say so and stop. With --json: one document a line, a line each time.")
@click.option("--count", "frames", type=status_live.FRAMES, default=None, metavar="N",
              help="With --watch: stop after N showings (the first included).")
def status(watch_s: float | None, frames: int | None) -> None:
    """Where each milestone stands, and what is left to do, in rows; and the run going now,
    from any host: its pass, keys done of total, rate, time left, waits, last batch, who
    steered it. Read-only.

    Example: toolkit status

    Example: toolkit status --watch 5
    """
    runner = _runner()
    report = runner.status()
    now = status_live.read_now(runner)
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
            again = "" if entry["state"] == state.VERIFIED else (
                f" Run `toolkit migrate {entry['milestone']}"
                f"{' --yes' if registry.get(entry['milestone']).confirm else ''}` to verify it and "
                "record it verified again.")
            out.say(f"{entry['milestone']} is final: {entry['final']['why']}; it cannot be rolled "
                    f"back.{again}")
        if entry["state"] == state.APPLIED and not entry["final"]:
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
    status_live.watch(runner, watch_s, frames, now)


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
    runner = app().runner()
    with runner.engine.connect() as conn:
        runner.check_gitlab(conn, columns=False)
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
