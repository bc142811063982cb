"""What every command shares: the target database, resolved once, and the output mode."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from sqlalchemy.engine import Engine

from toolkit import milestones, output
from toolkit.cli.metrics import MetricsTextfile
from toolkit.cli.observe import EventStream, Observed, Sink, new_run_id
from toolkit.db import Target, create_engine, resolve_target
from toolkit.engine.inspection import Inspector
from toolkit.engine.runner import Runner
from toolkit.engine.settings import RunOptions


@dataclass
class AppContext:
    database_url: str | None = None
    gitlab_config: str | None = None
    json_mode: bool = False
    quiet: bool = False
    command: str = ""
    read_timeout_s: float | None = None
    events_path: str | None = None  # --events FILE ('-': stderr)
    metrics_path: str | None = None  # --metrics-textfile PATH
    _observed: Observed | None = field(default=None, repr=False)
    _target: Target | None = field(default=None, repr=False)
    _engine: Engine | None = field(default=None, repr=False)
    _holds: ExitStack = field(default_factory=ExitStack, repr=False)

    def target(self) -> Target:
        if self._target is None:
            target = resolve_target(self.database_url, self.gitlab_config)
            if target.source == "sandbox":  # no database given: hold the sandbox for the run
                self.hold_sandbox(exclusive=False)
            self._target = target
            output.out.secrets = self._target.secrets
            # Which database, and from where: on stderr, so what a command prints on stdout
            # (`toolkit sql ... > rebuild.sql`) is its output alone. With --json the
            # document's "database" says it instead.
            if not self.json_mode:
                output.out.note(self._target.announcement())
        return self._target

    def engine(self) -> Engine:
        if self._engine is None:
            timeout = None if self.read_timeout_s is None else int(self.read_timeout_s * 1000)
            self._engine = create_engine(self.target(), read_timeout=timeout)
        return self._engine

    def runner(self, options: RunOptions | None = None, **kwargs: Any) -> Runner:
        """A runner over this command's database, handed the milestone plan, reporting to
        the terminal (the engine itself prints nothing): for a command that writes."""
        return Runner(self.engine(), options, plan=milestones.plan(), events=self.events(), **kwargs)

    def inspector(self) -> Inspector:
        """What a command that only reads uses (``plan``, ``verify``, ``status``, ...): the
        milestones read in snapshots the server keeps read-only."""
        return Inspector(self.engine(), milestones.plan(), events=self.events())

    def events(self) -> output.Output | Observed:
        """The terminal, or the terminal and the sinks --events and --metrics-textfile asked
        for (cli/observe.py, cli/metrics.py), opened once, when the command first builds a
        runner (its ``start`` line)."""
        if self.events_path is None and self.metrics_path is None:
            return output.out
        if self._observed is None:
            database = self.target().url.database
            sinks: list[Sink] = []
            if self.events_path is not None:
                sinks.append(EventStream(self.events_path, new_run_id(), lambda: output.out.secrets))
            if self.metrics_path is not None:
                sinks.append(MetricsTextfile(self.metrics_path, database))
            self._observed = Observed(output.out, sinks)
            self._observed.start(self.command, database)
        return self._observed

    def ended(self, exit_code: int, error: dict[str, Any] | None = None) -> None:
        """Tell the sinks how the command ended (a no-op without them)."""
        if self._observed is not None:
            self._observed.end(exit_code, error)

    def hold_sandbox(self, *, exclusive: bool, data_dir: Path | None = None) -> None:
        """Hold the sandbox until the command ends (see :mod:`toolkit.sandbox.lock`):
        exclusively for a command that replaces its database, shared for one that uses it."""
        from toolkit.sandbox.lock import hold
        from toolkit.sandbox.server import SandboxServer

        self._holds.enter_context(hold(SandboxServer(data_dir).data_dir, f"toolkit {self.command}",
                                       exclusive=exclusive))

    def close(self) -> None:
        if self._observed is not None:
            self._observed.close()
            self._observed = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        self._holds.close()

    def finish(self, result: dict[str, Any]) -> None:
        """Emit a successful command's one JSON document (no-op for a person).

        A failing command raises instead; the error handler emits its document.
        """
        self.ended(0)
        output.out.document(envelope(self.command, True, 0, database=self.database(), result=result))

    def database(self) -> str | None:
        """The database this command used, as every message shows it (password masked), or
        None when it connected to none."""
        return self._target.describe() if self._target is not None else None


def envelope(command: str, ok: bool, exit_code: int, *, database: str | None = None,
             **parts: Any) -> dict[str, Any]:
    """The stable shape of every --json document (documented in docs/output.md): ``database``
    names the database the command used (masked; null when it used none), so a CI log
    shows which one a result is about."""
    return {"command": command, "ok": ok, "exit_code": exit_code, "database": database, **parts}


def app(ctx: click.Context | None = None) -> AppContext:
    ctx = ctx or click.get_current_context()
    return ctx.ensure_object(AppContext)


def debug_enabled() -> bool:
    return os.environ.get("TOOLKIT_DEBUG", "") not in ("", "0")
