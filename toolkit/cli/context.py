"""What every command shares: the target database, resolved once, and the output mode."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import click
from sqlalchemy.engine import Engine

from toolkit import milestones, output
from toolkit.cli.metrics import MetricsTextfile
from toolkit.cli.observe import EventStream, Observed, Sink, new_run_id
from toolkit.db import Target, create_engine, resolve_target
from toolkit.engine.batches import RunOptions
from toolkit.engine.runner import Runner


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

    def target(self) -> Target:
        if self._target is None:
            self._target = resolve_target(self.database_url, self.gitlab_config)
            output.out.secrets = self._target.secrets
            output.out.say(self._target.announcement())  # which database, and from where
        return self._target

    def engine(self) -> Engine:
        if self._engine is None:
            timeout = None if self.read_timeout_s is None else int(self.read_timeout_s * 1000)
            self._engine = create_engine(self.target(), read_timeout=timeout)
        return self._engine

    def runner(self, options: RunOptions | None = None, **kwargs: Any) -> Runner:
        """A runner over this command's database, handed the milestone plan, reporting to
        the terminal (the engine itself prints nothing)."""
        return Runner(self.engine(), options, plan=milestones.plan(), events=self.events(), **kwargs)

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

    def close(self) -> None:
        if self._observed is not None:
            self._observed.close()
            self._observed = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def finish(self, result: dict[str, Any]) -> None:
        """Emit a successful command's one JSON document (no-op for a person).

        A failing command raises instead; the error handler emits its document.
        """
        self.ended(0)
        output.out.document(envelope(self.command, True, 0, result=result))


def envelope(command: str, ok: bool, exit_code: int, **parts: Any) -> dict[str, Any]:
    """The stable shape of every --json document (documented in the README)."""
    return {"command": command, "ok": ok, "exit_code": exit_code, **parts}


def app(ctx: click.Context | None = None) -> AppContext:
    ctx = ctx or click.get_current_context()
    return ctx.ensure_object(AppContext)


def debug_enabled() -> bool:
    return os.environ.get("TOOLKIT_DEBUG", "") not in ("", "0")
