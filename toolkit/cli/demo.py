"""``toolkit demo``: the whole blueprint on the sandbox, start to end, in a few lines per stage."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa

from toolkit import milestones as registry
from toolkit.cli import params
from toolkit.cli.context import app
from toolkit.cli.invoked import typed_command
from toolkit.db import create_engine
from toolkit.engine.runner import Runner
from toolkit.engine.settings import RunOptions
from toolkit.errors import SandboxReplaced, VerificationFailed
from toolkit.inventory import table_counts
from toolkit.milestones.m1_packages import NAME as M1
from toolkit.mlflow_api.demo import ClientReadings
from toolkit.output import Output, out
from toolkit.report import candidate_report
from toolkit.sandbox.database import SameDatabase, seed_sandbox
from toolkit.sandbox.server import SandboxServer, ServerStatus
from toolkit.sandbox.training_demo import TrainingDuringMigration
from toolkit.verify.differences import compare
from toolkit.verify.fingerprint import Fingerprint, take
from toolkit.words import counted

STEP_INDENT = "   "  # the demo's lines under each numbered step


@click.command()
@click.option("--seed", "seed_value", type=params.SEED, default=1, show_default=True,
              help="Data generator seed.")
@click.option("--batch-size", type=params.BATCH_SIZE, default=50, show_default=True,
              help="Small, so the demo runs several batches per step.")
def demo(seed_value: int, batch_size: int) -> None:
    """Run the whole blueprint on the sandbox: plan, migrate 1-4, verify, report, roll back.

    Starts the sandbox, seeds a small realistic data set, applies the four milestones
    (verifying each), shows the candidate report, rolls all four back and checks that
    the fingerprint (ML tables and MLflow view) is back to what it was. The real MLflow
    client (mlflow-skinny, when installed) reads the sandbox through `toolkit mlflow serve`
    before and after each milestone and after the last rollback: every reading must be
    the same. Meanwhile two training clients (the real MLflow client) write to the last
    project through `toolkit mlflow serve --allow-writes`, from before milestone 1 to after
    the last rollback; every write they were told succeeded must read back (a server that
    refuses writes is said, not a failure). Exit 0 only if every check held. Replaces the
    sandbox database ($TOOLKIT_SANDBOX_DIR, else the default `toolkit sandbox --help`
    names); never touches any other. Refused (exit 3) while another toolkit run uses that
    sandbox; fails (exit 1) if its database is replaced while the demo runs. Leaves the
    sandbox running, for the commands it suggests; `toolkit sandbox stop` stops it.

    Example: toolkit demo
    """
    server = SandboxServer()
    app().hold_sandbox(exclusive=True, data_dir=server.data_dir)  # refused while another run uses it
    toolkit = typed_command()
    out.say("1. Sandbox: starting the embedded PostgreSQL and seeding a small GitLab data set...")
    was_running = server.status().running
    status = server.start()
    report = seed_sandbox(status, "small", "realistic", seed_value)
    engine = create_engine(status.url())
    same = SameDatabase(status, engine)
    stack = ExitStack()
    try:
        runner = Runner(engine, RunOptions(batch_size=batch_size), plan=registry.plan(),
                        command="toolkit demo", events=Indented(out))
        counts, before = _seeded(runner, report.seconds, status.data_dir)
        readings, training = _clients(stack, runner, status.url(), seed_value)
        _plan(runner)
        stages = _apply(runner, readings)
        _candidate_report(runner, toolkit)
        stages += _roll_back(runner, stages)
        out.say(f"   {training.finish()}")
        _round_trip(runner, before)
        readings.again()
        out.say(f"7. {readings.summary()}")
        same.check()
    except Exception as failure:
        try:
            same.check()  # a database replaced under the demo is the failure to report
        except SandboxReplaced as replaced:
            raise replaced from failure
        except Exception:
            pass  # the server itself went away: the first failure says so
        raise
    finally:
        stack.close()
        engine.dispose()
    _go_on(toolkit, status, was_running)
    app().finish({"sandbox": str(status.data_dir), "sandbox_running": True, "counts": counts,
                  "stages": stages,
                  "round_trip_identical": True, "mlflow_client": readings.as_dict(),
                  "mlflow_writes": training.as_dict()})


def _seeded(runner: Runner, seconds: float, data_dir: Path) -> tuple[dict[str, int | None], Fingerprint]:
    """Step 1, the data: its counts said, and the fingerprint step 6 compares with."""
    with runner.inspector.read_only() as conn:
        counts = table_counts(conn)
        before = take(conn)
    out.say(f"   {counted(counts['ml_experiments'] or 0, 'experiment')}, "
            f"{counted(counts['ml_candidates'] or 0, 'candidate')}, "
            f"{counted(counts['ml_candidate_metrics'] or 0, 'metric')}, "
            f"{counted(counts['packages_packages'] or 0, 'package')} "
            f"(seeded in {seconds:.1f}s, data in {data_dir})")
    return counts, before


def _clients(stack: ExitStack, runner: Runner, url: str,
             seed_value: int) -> tuple[ClientReadings, TrainingDuringMigration]:
    """Step 1, the MLflow clients: the readings (every project but the last) and the
    training clients writing to the last project, both until ``stack`` closes."""
    readings = stack.enter_context(ClientReadings(url))
    with runner.inspector.read_only() as conn:  # the training clients' project, left out of the readings
        training_project = conn.execute(sa.text("SELECT max(id) FROM projects")).scalar_one()
    if hasattr(readings, "projects"):
        readings.projects = [p for p in readings.projects if p != str(training_project)]
    out.say(f"   {readings.first()}")
    training = stack.enter_context(TrainingDuringMigration(url, training_project, seed=seed_value))
    out.say(f"   {training.started()}")
    return readings, training


def _plan(runner: Runner) -> None:
    out.say("2. Plan (read-only, one snapshot):")
    for milestone in registry.MILESTONES.values():
        plan = runner.inspector.plan(milestone)
        rows = ", ".join(f"{s.step} {s.rows}" for s in plan.steps if s.kind == "data")
        out.say(f"   {milestone.name}: {rows}")


def _apply(runner: Runner, readings: ClientReadings) -> list[dict[str, Any]]:
    """Step 3: each milestone applied and verified, the clients reading after each; the
    stages for the JSON document."""
    stages: list[dict[str, Any]] = []
    out.say("3. Apply each milestone, verifying after each:")
    for milestone in registry.MILESTONES.values():
        result = runner.migrate(milestone)
        if result.verify is None or not result.verify.ok:
            raise (result.verify.failure() if result.verify else
                   VerificationFailed(f"{milestone.name} did not complete", "see `toolkit status`"))
        mlflow = next(c for c in result.verify.checks if c.name.startswith("the MLflow view"))
        out.say(f"   {milestone.name}: {counted(result.rows, 'row')}, "
                f"{counted(len(result.verify.checks), 'check')} hold; "
                f"MLflow view unchanged ({mlflow.detail.split(' (')[0]}){readings.again()}")
        if said := _what_users_see_change(mlflow.detail, milestone.name):
            out.say(f"     {said}")
        stages.append({"stage": f"migrate {milestone.name}", "rows": result.rows, "ok": True})
    return stages


def _candidate_report(runner: Runner, toolkit: str) -> None:
    out.say("4. Candidate report of one model, through ml_candidates.model_id:")
    with runner.inspector.read_only() as conn:
        project_id, model_name = conn.execute(sa.text(
            "SELECT m.project_id, m.name FROM ml_models m JOIN ml_candidates c ON c.model_id = m.id "
            "GROUP BY m.id ORDER BY count(*) DESC, m.id LIMIT 1")).one()
        candidates = candidate_report(conn, project_id, model_name, "accuracy")
    for row in candidates["candidates"][:3]:
        out.say(f"   {model_name} #{row['iid']} {row['name'] or '(no name)'}: "
                f"accuracy {row['metrics'].get('accuracy')}, params {row['params']}")
    out.say(f"   ({counted(len(candidates['candidates']), 'candidate')}; full table: "
            f"{toolkit} report candidates --project {project_id} --model {model_name})")


def _roll_back(runner: Runner, applied: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step 5: the four milestones rolled back, newest first, each checked; the stages."""
    stages: list[dict[str, Any]] = []
    out.say("5. Roll back all four milestones, newest first:")
    for milestone in reversed(list(registry.MILESTONES.values())):
        result, checks = runner.rollback(milestone)
        failed = [c for c in checks if not c.ok]
        if failed:
            raise VerificationFailed(f"rollback of {milestone.name}: {failed[0].detail}",
                                     failed[0].remedy)
        undone = sum(1 for p in result.passes if p.schema_change and p.changed)
        written = next(s["rows"] for s in applied if s["stage"] == f"migrate {milestone.name}")
        if result.rows or not written:
            said = (f"{counted(result.rows, 'row')} restored or removed in batches, "
                    f"{counted(undone, 'schema change')} undone")
        else:  # milestone 2: dropping its column takes the values it backfilled with it
            said = (f"{counted(undone, 'schema change')} undone, which took the "
                    f"{counted(written, 'value')} it had written with them")
        out.say(f"   {milestone.name}: rolled back: {said}")
        stages.append({"stage": f"rollback {milestone.name}", "rows": result.rows, "ok": True})
    return stages


def _round_trip(runner: Runner, before: Fingerprint) -> None:
    """Step 6: the fingerprint after the round trip equals the one taken before step 3."""
    out.say("6. Compare the fingerprint with the one taken before step 3:")
    with runner.inspector.read_only() as conn:
        after = take(conn, before.watermarks)
    if differences := compare(before, after):
        raise VerificationFailed(
            "The fingerprint differs after the round trip: "
            + "; ".join(d.describe() for d in differences),
            "report this with `toolkit history` output")
    out.say(f"   identical: all {counted(len(before.tables), 'ML table')} and all "
            f"{counted(len(before.mlflow), 'part')} of "
            "the MLflow view (row counts and content hashes)")


def _go_on(toolkit: str, status: ServerStatus, was_running: bool) -> None:
    """What to type next, and that the sandbox is still running."""
    out.say(f"Every check held. Go on: `{toolkit} status`, `{toolkit} plan milestone-1`, "
            f"`{toolkit} history`.")
    if venv := _venv_of(toolkit):
        out.say(f"(Or activate the venv, `. {venv}/bin/activate`, and type plain `toolkit`, "
                "as the README's examples do.)")
    out.say(f"The sandbox is still running ({'as before' if was_running else 'started by the demo'}, "
            f"pid {status.pid}, data in {status.data_dir}); stop it with `{toolkit} sandbox stop`.")


class Indented:
    """The demo's runner events: what the engine narrates (``Taking the fingerprint ...``)
    is indented under the demo's current numbered step, not a line of its own between
    them; warnings, notes and progress go on as the terminal shows them."""

    def __init__(self, events: Output) -> None:
        self.events = events

    @property
    def secrets(self) -> tuple[str, ...]:
        return self.events.secrets

    def say(self, message: str = "") -> None:
        self.events.say(f"{STEP_INDENT}{message}" if message else message)

    def warn(self, message: str) -> None:
        self.events.warn(message)

    def note(self, message: str) -> None:
        self.events.note(message)

    def progress(self, total: int | None, name: str) -> Any:
        return self.events.progress(total, name)


def _venv_of(command: str) -> str | None:
    """``.venv`` for ``.venv/bin/toolkit``, or for ``.venv/bin/python -m toolkit``; None
    when the command is not run by its path from a venv's ``bin``."""
    if command == "toolkit":
        return None
    program = Path(command.split(" -m ")[0])
    return str(program.parent.parent) if program.parent.name == "bin" else None


def _what_users_see_change(detail: str, milestone: str) -> str:
    """The declared differences the milestone's own ledger accounts for, as a user sees them:
    milestone 1's artifact URIs, milestone 3's new models and copied tags in the registry."""
    declared = detail.split("declared differences, from the ledgers: ")[-1].split(";")[0] \
        if "declared differences" in detail else ""
    mine = [d.strip() for d in declared.split(",") if milestone in d]
    if not mine:
        return ""
    if milestone == M1:
        return (f"GitLab's artifact_uri changes, as on GitLab: {', '.join(mine)} "
                "(…/packages/generic/… becomes …/packages/ml_models/…/files/); every other field equal")
    return (f"registry users see {', '.join(mine)} (get_registered_model: one model per experiment "
            "that had none, named by slug; tags copied to existing models); no existing model "
            "changed otherwise")
