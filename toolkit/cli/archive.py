"""``toolkit archive``: what milestone 4 kept of the dropped tables, and dropping it for good."""

from __future__ import annotations

import click
import sqlalchemy as sa

from toolkit import catalog
from toolkit.cli.context import app
from toolkit.engine import state
from toolkit.engine.inspection import Inspector
from toolkit.engine.results import MilestoneState
from toolkit.errors import PreconditionRefused
from toolkit.milestones.m4 import NAME as M4
from toolkit.milestones.m4 import archive as m4_archive
from toolkit.milestones.m4.final import DROP_COMMAND, archive_dropped
from toolkit.names import M4_ARCHIVE_EXPERIMENTS, M4_EXPERIMENT_IDS
from toolkit.output import out
from toolkit.words import counted


@click.group()
def archive() -> None:
    """Milestone 4's archive of ml_experiments, their metadata and candidates' experiment_id.

    Example: toolkit archive status
    """


def _counts(conn: sa.Connection) -> dict[str, int | None]:
    counts = {}
    for table in m4_archive.TABLES:
        present = catalog.relation_exists(conn, table)
        count = sa.text(f"SELECT count(*) FROM {table}")
        counts[table] = conn.execute(count).scalar_one() if present else None
    return counts


@archive.command()
def status() -> None:
    """Rows kept in the archive, and the MLflow experiment id (iid) -> model mapping. Read-only.

    Example: toolkit archive status --json
    """
    inspector = app().inspector()
    with inspector.read_only() as conn:
        inspector.check_gitlab(conn, columns=False)
        counts = _counts(conn)
        milestone = state.milestone_state(conn, M4)["state"]
        mapping = []
        # the archive while it exists; after milestone 4's drop the ids it kept for good
        source = next((t for t in (M4_ARCHIVE_EXPERIMENTS, M4_EXPERIMENT_IDS)
                       if catalog.relation_exists(conn, t)
                       and conn.execute(sa.text(f"SELECT EXISTS (SELECT 1 FROM {t})")).scalar_one()), None)
        if source:
            mapping = [dict(r._mapping) for r in conn.execute(sa.text(
                "SELECT project_id, iid AS mlflow_experiment_id, name, model_id "
                f"FROM {source} ORDER BY project_id, iid LIMIT 20"))]
    out.say(f"{M4}: {milestone.replace('_', ' ')}")
    out.table(["archive table", "rows"], [[t, "absent" if n is None else n] for t, n in counts.items()])
    if mapping:
        out.say(f"MLflow experiment ids (per project) and their models, first rows (from {source}):")
        out.table(["project", "mlflow experiment_id", "name", "model_id"],
                  [[m["project_id"], m["mlflow_experiment_id"], m["name"], m["model_id"]] for m in mapping])
    app().finish({"milestone_4": milestone, "tables": counts, "mapping_sample": mapping})


def _refuse_unless_verified(inspector: Inspector) -> None:
    with inspector.read_only() as conn:
        inspector.check_gitlab(conn, columns=False)
        milestone = state.milestone_state(conn, M4)["state"]
    if milestone != MilestoneState.VERIFIED:
        raise PreconditionRefused(
            f"{M4} is {milestone.replace('_', ' ')}, not verified: the archive is still needed",
            f"run `toolkit verify {M4}` (or finish or roll back milestone 4) first")


@archive.command()
@click.option("--yes", is_flag=True, help="Really drop it: milestone 4 can then no longer be rolled back.")
def drop(yes: bool) -> None:
    """Drop the archive for good, once milestone 4 verifies and nobody needs a rollback.

    The archive holds the only copy of the dropped experiments' rows and tags: export it
    first if you need it. The MLflow experiment id of each model stays (in
    toolkit.mlflow_experiment_ids, which milestone 4 wrote; the drop first copies there any
    archived experiment a toolkit before that table never kept, and drops nothing if one
    has no model), so `toolkit mlflow serve` still answers experiments, runs and the
    registry afterwards.

    Example: toolkit archive drop --yes
    """
    if not yes:
        raise PreconditionRefused("Dropping the archive makes milestone 4 impossible to roll back",
                                  "pass --yes when you are sure (export the mapping first if needed)")
    engine = app().engine()
    runner = app().runner()
    with runner.inspector.read_only() as conn:
        runner.inspector.check_gitlab(conn, columns=False)
        gone = archive_dropped(conn)
    if gone is not None:
        out.say(f"Nothing to drop: {M4} {gone.why}.")
        app().finish({"dropped": {}, "already": gone.as_dict()})
        return
    _refuse_unless_verified(runner.inspector)  # before anything is written
    # Under the runner lock and the fenced lease: a rollback of milestone 4 rebuilds from this
    # very archive, so the two must never overlap; the state is read again under the lock.
    with runner.exclusive(DROP_COMMAND, M4):
        _refuse_unless_verified(runner.inspector)
        with engine.connect() as conn:
            counts = _counts(conn)
            m4_archive.drop_everything(conn)
            conn.commit()
    out.say("Dropped the archive: " + ", ".join(f"{t} ({counted(n, 'row')})" for t, n in counts.items() if n))
    app().finish({"dropped": counts})
