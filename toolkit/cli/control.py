"""``toolkit control``: steer the run going on a database from any host that reaches it.

A request is a row in ``toolkit.run_controls`` (engine/control.py); the run takes it at its
next batch boundary, or within half a second while it waits. ``set`` converts its value
with the very parameter type of the run's option, built from the settings tree's bound
(engine/settings.py), so a value the option would refuse is refused here, exit 2, before
anything is stored.
"""

from __future__ import annotations

import click

from toolkit.cli import params
from toolkit.cli.context import app
from toolkit.engine import control as steering
from toolkit.engine.locks import describe_runner, runner_lock_holders
from toolkit.engine.settings import SETTABLE
from toolkit.errors import PreconditionRefused, UsageProblem
from toolkit.output import out
from toolkit.schema.migrations import ensure_own_tables

# set KEY: the option's own parameter type, built from the same bound of the settings tree
TYPES: dict[str, click.ParamType] = {key: params.of(entry.spec.bound)
                                     for key, entry in SETTABLE.items()}

REASON = click.option("--reason", type=params.Text("--reason"), default=None, metavar="TEXT",
                      help="Why: kept with the request, shown by the run, `toolkit status` and history.")


@click.group("control")
def control() -> None:
    """Steer the run going on this database, from any host: pause, resume, abort, set, unpostpone.

    The request is stored in the toolkit schema (who: database user, OS user, host; when;
    why) and the run takes it at its next batch boundary. With no run going, the request is
    kept as refused and the command exits 3: a request is never left for a later run.

    Example: toolkit control pause --reason "vacuum of ci_builds first"
    """


def _send(action: str, reason: str | None, key: str | None = None, value: str | None = None) -> None:
    inspector = app().inspector()
    with inspector.engine.connect() as conn:
        inspector.check_gitlab(conn, columns=False)  # never a toolkit schema in another database
        ensure_own_tables(conn)
        holders = runner_lock_holders(conn)
        conn.rollback()
        row = steering.request(conn, action, key, value, reason, run_going=bool(holders))
    what = f"set {key}={value}" if action == "set" else action
    result = {"request_id": row["id"], "action": action, "key": key, "value": value, "reason": reason,
              "db_user": row["db_user"], "requested_at": row["requested_at"].isoformat(),
              "run": [describe_runner(h) for h in holders]}
    if not holders:
        raise PreconditionRefused(
            f"no toolkit run is going on {row['database']}: the {what} request (#{row['id']}) is "
            "recorded but no run will act on it",
            "start the run first (`toolkit status` shows what is left), then send the request again",
            details=result)
    out.say(f"{what} requested (#{row['id']}) for {describe_runner(holders[0])}; the run takes it "
            "at its next batch boundary")
    app().finish(result)


@control.command()
@REASON
def pause(reason: str | None) -> None:
    """Stop starting batches; the run keeps its lock and says so every minute.

    Example: toolkit control pause --reason "replica rebuild"
    """
    _send("pause", reason)


@control.command()
@REASON
def resume(reason: str | None) -> None:
    """Go on with a paused run.

    Example: toolkit control resume
    """
    _send("resume", reason)


@control.command()
@REASON
def abort(reason: str | None) -> None:
    """Stop the run at its next batch boundary with exit code 6: run the same command to resume.

    Example: toolkit control abort --reason "change window over"
    """
    _send("abort", reason)


@control.command()
@REASON
def unpostpone(reason: str | None) -> None:
    """Let a run held before milestone 4's drops (`migrate --hold-before-drop`) drop.

    Example: toolkit control unpostpone --reason "backup verified"
    """
    _send("unpostpone", reason)


SET_HELP = f"""Change an option of the running run, within the option's own bounds.

    KEY is one of: {", ".join(f"{key} (MB/s)"
                              if entry.spec.bound.kind == "rate" else key
                              for key, entry in SETTABLE.items())}.

    Example: toolkit control set target-batch-ms=200
    """


@control.command("set", help=SET_HELP)
@click.argument("setting", metavar="KEY=VALUE")
@REASON
def set_(setting: str, reason: str | None) -> None:
    """Change an option of the running run (the help is SET_HELP: the keys are the tree's)."""
    key, sep, raw = setting.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or key not in TYPES:
        raise UsageProblem(f"control set {setting!r}: not KEY=VALUE with a KEY the run can change",
                           f"give one of {', '.join(TYPES)}, e.g. `toolkit control set batch-size=500`")
    try:
        value = TYPES[key].convert(raw.strip(), None, None)
    except click.BadParameter as exc:
        raise UsageProblem(f"control set {key}: {exc.message}",
                           getattr(exc, "next_step", None) or f"give --{key} a value its option takes"
                           ) from exc
    _send("set", reason, key, str(value))
