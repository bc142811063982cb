"""``toolkit adopt``: declare what GitLab's tables show in place after the toolkit's schema
was lost, so the toolkit can go on from there (engine/ledger.py says why it refuses until
then). Only for a schema that is gone as a whole: a damaged one is moved aside by the
operator first, so nothing of it is overwritten."""

from __future__ import annotations

import json

import click
import sqlalchemy as sa

from toolkit.cli.context import app
from toolkit.engine import state
from toolkit.engine.ledger import ADOPT, joined, ledger_lost, schema_exists
from toolkit.engine.results import MilestoneState
from toolkit.errors import PreconditionRefused
from toolkit.output import out
from toolkit.schema.own import SCHEMA


@click.command()
@click.option("--yes", is_flag=True, help="Declare it: without it, adopt says what it would record "
                                          "and refuses.")
def adopt(yes: bool) -> None:
    """Record the milestones GitLab's tables show in place, after the toolkit's schema was lost.

    Only when the schema `toolkit` is gone and GitLab's tables show milestones' changes
    (ml_candidates.model_id, ml_models.display_name, ml_experiments dropped). It makes a new
    schema and records those milestones as applied, for good: their ledgers (converted
    packages, created models, milestone 4's archive) were lost, so they can never be rolled
    back by the toolkit. Restoring the schema from a backup is the other way, and keeps
    rollbacks possible.

    Example: toolkit adopt --yes
    """
    runner = app().runner(command=f"{ADOPT} --yes")
    with runner.engine.connect() as conn:
        lost = ledger_lost(conn, runner.milestones)
        if lost is None:
            runner.inspector.check_gitlab(conn, columns=False)  # not GitLab's: said as every command says it
        still_there = schema_exists(conn)
        conn.rollback()
    if lost is None:
        raise PreconditionRefused(
            "Nothing to adopt: the toolkit's ledger is in order, or GitLab's tables show no "
            "milestone in place", "`toolkit status` shows where each milestone stands")
    names = list(lost.in_place)
    if still_there:
        raise PreconditionRefused(
            f"The toolkit's ledger is damaged ({lost.what}) but the schema {SCHEMA} is still "
            "there; adopt does not write over what is left of it",
            f"restore it from a backup, or move it aside (ALTER SCHEMA {SCHEMA} RENAME TO "
            f"{SCHEMA}_damaged) and run `{ADOPT} --yes` again")
    if not yes:
        raise PreconditionRefused(
            f"`{ADOPT}` would record {joined(names)} as applied, for good ({lost.described()}): "
            "they could never be rolled back by the toolkit",
            f"pass --yes to declare it, or restore the {SCHEMA} schema from a backup instead")
    with runner.exclusive(ADOPT) as run_id, runner.engine.connect() as conn:
        conn.execute(sa.text(f"""
            UPDATE {SCHEMA}.runs SET options = CAST(:options AS jsonb) WHERE id = :id"""),
            {"id": run_id, "options": json.dumps({"adopted": lost.in_place, "ledger": lost.what})})
        conn.commit()
        for name in names:
            state.set_milestone_state(conn, name, MilestoneState.APPLIED, run_id)
    out.say(f"Recorded {joined(names)} as applied (run {run_id}); they can no longer be rolled back. "
            "`toolkit status` shows where each milestone stands.")
    app().finish({"adopted": lost.in_place, "run_id": run_id})
