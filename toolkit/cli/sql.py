"""``toolkit sql``: the statements a milestone runs, as the engine runs them, for review.

Each action renders its own SQL (the action protocol, engine/actions.py); this module adds
what a reviewer needs around it: the timeouts it runs under, numbered binds for squawk and
psql, and a legend of what each bind is.
"""

from __future__ import annotations

import re

import click
from sqlalchemy.engine import Connection

from toolkit import milestones as registry
from toolkit.cli.context import app
from toolkit.cli.migrate import MILESTONE
from toolkit.db import NoDatabaseGiven
from toolkit.engine.ddl import StoredStatements
from toolkit.engine.plan import Milestone
from toolkit.engine.settings import RunOptions


@click.command()
@MILESTONE
@click.option("--rollback", "backward", is_flag=True, help="The rollback statements instead.")
def sql(milestone: str, backward: bool) -> None:
    """Print the statements a milestone runs, for a DBA to review.

    Connects to nothing, unless milestone 4's --rollback is asked and a database is given
    (any source the other commands read: --database-url, --gitlab-config,
    $TOOLKIT_DATABASE_URL, libpq's PGHOST/PGSERVICE..., the running sandbox): then the
    statements its rebuild reads from that database (the DDL it recorded before dropping)
    are printed as they will run, in a read-only transaction. Without a database they show
    as the query that yields them. Only the statements go to stdout (which database: stderr), so
    `toolkit sql milestone-4 --rollback > rebuild.sql` is a script.

    Example: toolkit sql milestone-1 --rollback
    """
    chosen = registry.get(milestone)
    context = app()
    if backward and _reads_at_run_time(chosen) and _database_given():
        inspector = context.inspector()
        with inspector.read_only() as conn:
            inspector.check_gitlab(conn, columns=False)
            statements = _sql_statements(chosen, backward, conn)
    else:
        statements = _sql_statements(chosen, backward)
    if not app().json_mode:
        click.echo("\n".join(statements))
    app().finish({"milestone": chosen.name, "rollback": backward, "statements": statements})


def _reads_at_run_time(milestone: Milestone) -> bool:
    """Whether the milestone's rollback runs statements it reads from the database (milestone
    4's rebuild); every other script is the same on any database, so nothing connects."""
    return any(isinstance(action, StoredStatements) for step in milestone.steps for action in step.backward())


def _database_given() -> bool:
    """Whether any source names a database (the one every other command would use)."""
    try:
        app().target()
    except NoDatabaseGiven:
        return False
    return True


PARAMETER_MEANINGS = {
    "lo": "the checkpoint: keys above it (exclusive)",
    "hi": "the batch's last key (inclusive)",
    "upper": "the pass's last key, fixed when it started",
    "size": "the batch size",
    "run_id": "this run's id in toolkit.runs",
    "experiment_ids": "the batch's experiments without a model (bigint[])",
    "slugs": "their model names, computed by the slug rules (text[])",
    "projects": "the batch's project ids (bigint[])",
    "models": "the batch's models to remove (bigint[])",
}
_NAMED_PARAMETER = re.compile(r"(?<![:\w]):([a-z_]+)\b")


def positional(sql: str) -> str:
    """Named binds as PostgreSQL's $1, $2 … with a comment saying what each is.

    The engine binds by name; a DBA's tools and squawk want valid SQL, so ``toolkit sql``
    prints the same statement with positional parameters.
    """
    order: list[str] = []

    def number(match: re.Match) -> str:
        if match[1] not in order:
            order.append(match[1])
        return f"${order.index(match[1]) + 1}"

    body = _NAMED_PARAMETER.sub(number, sql)
    if not order:
        return body
    legend = "\n".join(f"--   ${i + 1} = {name}: {PARAMETER_MEANINGS.get(name, name)}"
                       for i, name in enumerate(order))
    return f"-- Parameters:\n{legend}\n{body}"


def _sql_statements(milestone: Milestone, backward: bool, conn: Connection | None = None) -> list[str]:
    """The statements as the toolkit runs them, each with the timeouts it runs under (the
    defaults; --lock-timeout-ms, --statement-timeout-ms and --ddl-lock-timeout-ms change
    them), so a DBA who runs the reviewed script gets the same safety. With ``conn``,
    statements the toolkit reads from the database at run time (milestone 4's rebuild) are
    shown as they will run."""
    options = RunOptions()
    batch_timeouts = (f"SET LOCAL lock_timeout = '{options.lock_timeout_ms}ms';\n"
                      f"SET LOCAL statement_timeout = '{options.statement_timeout_ms}ms';")
    ddl_timeouts = (f"SET lock_timeout = '{options.ddl_lock_timeout_ms}ms';\n"
                    f"SET statement_timeout = '{options.statement_timeout_ms}ms';")
    lines = [
        "-- Each statement below carries the timeouts the toolkit runs it with: a batch sets\n"
        "-- them for its own transaction (SET LOCAL); a schema change for its session, reset\n"
        "-- right after (CREATE INDEX CONCURRENTLY runs outside a transaction)."
    ]
    for step in (reversed(milestone.steps) if backward else milestone.steps):
        for action in (step.backward() if backward else step.forward()):
            header = f"-- {milestone.name} / {action.name}: {action.description}\n-- {action.how_it_runs()}"
            sql_text = action.render_sql(conn)
            if action.in_batches:
                lines.append(f"{header}\nBEGIN;\n{batch_timeouts}\n{positional(sql_text)};\nCOMMIT;")
            else:
                lines.append(f"{header}\n{ddl_timeouts}\n{sql_text}\nRESET lock_timeout;\n"
                             "RESET statement_timeout;")
    return lines


def _comment(sql_text: str) -> str:
    return "\n".join(f"--   {line}" for line in sql_text.splitlines())
