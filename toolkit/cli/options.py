"""The writing commands' options, generated from the engine's settings tree (engine/settings.py).

Each option's name, default, type and bounds come from the tree; only its words are here.
The numbers a help text speaks of are read from the tree too, and the default and bounds
are added to it as ``[default: …; low to high unit]``, so ``--help`` says what the engine
does. The values Click gives back are named as the tree's fields, and become the run's
options in one place (``settings.from_operator``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from toolkit.cli import params
from toolkit.cli.context import app
from toolkit.engine.runner import Runner
from toolkit.engine.settings import (
    DEFAULT_TARGET_BATCH_MS,
    MAX_RECONNECT_DELAY_S,
    Entry,
    RunOptions,
    entries,
    from_operator,
)
from toolkit.engine.sizing import MOST_GROWTH, MOST_SHRINK
from toolkit.engine.walrate import WINDOW_S
from toolkit.milestones.m4 import NAME as M4

_O = RunOptions()
# key: (help, metavar or None); the numbers in braces are the tree's
HELP: dict[str, tuple[str, str | None]] = {
    "hold-before-drop": (f"{M4}: archive and check row for row, then wait before the first drop "
                         "(holding only the runner lock) until `toolkit control unpostpone`.", None),
    "hold-flag-file": (f"{M4}: as --hold-before-drop, and also go on once PATH does not exist.",
                       "PATH"),
    "batch-size": ("Keys of the driving table per batch (one short transaction each). Given, every "
                   "batch has this size (unless --target-batch-ms is given too); without it, batches "
                   f"start at {_O.batch_size} keys and adapt.", None),
    "target-batch-ms": (f"Resize batches (x{MOST_SHRINK:g} to x{MOST_GROWTH:g} each time, "
                        f"{_O.min_batch_size} to {_O.max_batch_size} keys) so each takes about this "
                        "long; 0 keeps the size fixed.", None),
    "pause-ms": ("Pause between batches, to leave room for GitLab's own traffic.", None),
    "max-batches": ("Do this many batches now, then stop; the next run resumes.", None),
    "max-runtime": ("Stop at the first batch boundary after this long; the next run resumes.",
                    "SECONDS"),
    "lock-timeout-ms": ("Longest a statement waits for a lock before the batch is retried.", None),
    "statement-timeout-ms": ("Longest a single statement may run.", None),
    "retries": ("Retries of a batch after a lock or statement timeout (with backoff).", None),
    "ddl-lock-timeout-ms": ("Longest a schema change waits for its lock (GitLab's queries queue "
                            "behind it meanwhile), before it is retried.", None),
    "ddl-retries": ("Retries of a schema change after a lock timeout (backoff up to "
                    f"{_O.ddl_backoff_max_s:g} s).", None),
    "lock-wait": ("How long to poll for the one-runner lock; then exit 7 (busy) if another run "
                  "still holds it.", "SECONDS"),
    "reconnect": ("When the database ends the session (restart, failover, a terminated session, "
                  "idle_session_timeout), resume by itself up to N times, waiting "
                  f"{_O.reconnect_backoff_s:g} s, {2 * _O.reconnect_backoff_s:g} s, "
                  f"{4 * _O.reconnect_backoff_s:g} s ... (at most {MAX_RECONNECT_DELAY_S:g} s) and "
                  "connecting to whichever host is the primary. Without it such a run stops with "
                  "exit code 75.", "N"),
    "max-replica-lag-ms": ("Before each batch and schema change, wait while a streaming replica "
                           "(pg_stat_replication) is this far behind in replay_lag. A replica "
                           "attached but not replaying counts as lagging.", "MS"),
    "max-replica-lag-bytes": ("Wait too while a replica has more than this many bytes of WAL not "
                              "yet replayed (replay_lag stays small while replay is paused; bytes "
                              "do not).", "BYTES"),
    "max-transaction-age-s": ("Wait while another session of this database has a transaction open "
                              "longer than this (it keeps VACUUM from removing what batches leave). "
                              "Waits too during a VACUUM of a table the batch writes, and while WAL "
                              "archiving has failed since the run started.", "SECONDS"),
    "max-archive-backlog": ("Wait while more WAL segments wait to be archived than when the run "
                            "started, by more than this (the archiver falling behind).", "SEGMENTS"),
    "max-wal-rate": ("Wait while the primary writes WAL faster than this many MB/s over the last "
                     f"{WINDOW_S:g} s (pg_current_wal_insert_lsn; every session's WAL counts, as it "
                     "does for replicas, archiving and DR). 1 MB = 1048576 bytes.", "MB/S"),
    "throttle-query": ("Your own check, run before each batch: wait while it returns true.", "SQL"),
    "throttle-flag-file": ("Wait while this file exists (create it to pause a run, remove it to go "
                           "on).", "PATH"),
    "no-throttle": ("Do not read the database's health nor wait on it.", None),
    "max-throttle-s": ("Wait at most this long in all on the database's health, then stop at the "
                       "batch boundary with exit code 6; the same command resumes.", "SECONDS"),
    "resume-with-this-version": ("Resume an unfinished milestone even though another toolkit "
                                 "version (or other options that change what is written) started "
                                 "it; without it such a resume is refused with exit code 3.", None),
}
# What --help says of a default the option does not have as a number.
SHOWN_DEFAULT = {"batch-size": "adaptive",
                 "target-batch-ms": f"{DEFAULT_TARGET_BATCH_MS} without --batch-size",
                 "max-batches": "no limit", "max-runtime": "no limit", "max-wal-rate": "no limit",
                 "max-throttle-s": "no limit", "throttle-query": "none", "throttle-flag-file": "none",
                 "hold-flag-file": "none"}
CLI_DEFAULT = {"batch-size": None}  # not given: adaptive (settings.batch_target)


def shown_default(entry: Entry) -> str:
    """The default as ``--help`` shows it."""
    return SHOWN_DEFAULT.get(entry.spec.key, str(entry.default))


def _option(entry: Entry) -> Callable[[Callable], Callable]:
    key, bound = entry.spec.key, entry.spec.bound
    text, metavar = HELP[key]
    if bound.kind == "flag":
        return click.option(f"--{key}", entry.name, is_flag=True, default=False, help=text)
    bounds = params.shown_bounds(bound)
    extra = f"default: {shown_default(entry)}" + (f"; {bounds}" if bounds else "")
    return click.option(f"--{key}", entry.name, type=params.of(bound), metavar=metavar,
                        default=CLI_DEFAULT.get(key, entry.default), help=f"{text}  [{extra}]")


def run_options(command: str) -> Callable[[Callable], Callable]:
    """The options of a writing command: every setting of the tree that ``command`` has."""
    def decorate(func: Callable) -> Callable:
        for entry in reversed([e for e in entries() if e.spec.only in (None, command)]):
            func = _option(entry)(func)
        return func
    return decorate


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


def runner_for(given: dict[str, Any] | None = None) -> Runner:
    """The runner for this command, with the run's options from those the operator gave."""
    options, lock_wait = from_operator(given or {})
    return app().runner(options, command=command_line(), lock_wait_s=lock_wait)


def command_line() -> str:
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
