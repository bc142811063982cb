"""``toolkit fleet``: plan, pipeline, job, report and k8s-job over an inventory of databases."""

from __future__ import annotations

import click

from toolkit.cli import params
from toolkit.cli.context import app, envelope
from toolkit.fleet import inventory
from toolkit.fleet.plan import DatabasePlan, plan_fleet
from toolkit.output import out

INVENTORY = click.option("--inventory", "-i", "inventory_path", metavar="PATH",
                         default=inventory.DEFAULT_PATH, show_default=True,
                         help="The fleet's inventory (docs/fleet.md).")


def _load(path: str) -> inventory.Fleet:
    return inventory.load(path)

CONCURRENCY = params.Whole(1, 256, "more connections than one machine should open")


@click.group()
def fleet() -> None:
    """The milestones on many GitLab databases: an inventory, a plan, a CI pipeline.

    The inventory (fleet.yml) names each database, how to reach it (an environment
    variable holding its URL, a libpq service, or GitLab's database.yml; never a
    password) and its wave (the first is the canary). See docs/fleet.md.

    Example: toolkit fleet plan --inventory fleet.yml
    """


def _milestone_states(row: DatabasePlan) -> str:
    short = {"not started": "-", "in_progress": "running", "rolled_back": "rolled back",
             "rolling_back": "rolling back"}
    return " ".join(short.get(s, s) for s in row.states.values()) if row.states else ""


def _estimate(row: DatabasePlan) -> str:
    if row.estimate_s is None:
        return "-" if row.error is None else ""
    return f"{row.estimate_s:.0f} s" if row.estimate_s >= 1 or row.estimate_s == 0 else "<1 s"


@fleet.command("plan")
@INVENTORY
@click.option("--concurrency", "-c", type=CONCURRENCY, default=4, show_default=True, metavar="N",
              help="Databases read at the same time (each one connection, one read-only transaction).")
def plan_command(inventory_path: str, concurrency: int) -> None:
    """Every database's milestones, next step, rows to change, anomalies and estimated
    time, in one table. Read-only; several databases at a time.

    A database that cannot be planned (unreachable, not GitLab's, its variable not set) is
    a row with its error and exit code; the command then exits with the first such code.

    Example: toolkit fleet plan --inventory fleet.yml --concurrency 8 --json
    """
    chosen = _load(inventory_path)
    read_timeout = app().read_timeout_s
    rows = plan_fleet(chosen, concurrency,
                      None if read_timeout is None else int(read_timeout * 1000))
    names = " ".join(f"m{i}" for i in range(1, 5))
    out.table(["database", "wave", "gitlab schema", f"states ({names})", "next", "rows to change",
               "anomalies", "estimate", "exit", "error"],
              [[r.database, r.wave, r.gitlab_schema or "-", _milestone_states(r), r.next_milestone or "-",
                "" if r.rows_to_change is None else r.rows_to_change,
                "" if r.anomalies is None else r.anomalies, _estimate(r), r.exit_code, r.error or ""]
               for r in rows])
    failed = [r for r in rows if r.exit_code]
    out.say(f"{len(rows) - len(failed)} of {len(rows)} databases planned"
            + (f"; not planned: {', '.join(r.database for r in failed)}" if failed else ""))
    result = {"inventory": inventory_path, "concurrency": concurrency,
              "databases": [r.as_dict() for r in rows]}
    if not failed:
        app().finish(result)
        return
    code = failed[0].exit_code
    out.document(envelope(app().command, False, code, result=result))
    click.get_current_context().exit(code)


