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
        return Runner(self.engine(), options, plan=milestones.plan(), events=output.out, **kwargs)

    def hold_sandbox(self, *, exclusive: bool, data_dir: Path | None = None) -> None:
        """Hold the sandbox until the command ends (see :mod:`toolkit.sandbox.lock`):
        exclusively for a command that replaces its database, shared for one that uses it."""
        from toolkit.sandbox.lock import hold
        from toolkit.sandbox.server import SandboxServer

        self._holds.enter_context(hold(SandboxServer(data_dir).data_dir, f"toolkit {self.command}",
                                       exclusive=exclusive))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        self._holds.close()

    def finish(self, result: dict[str, Any]) -> None:
        """Emit a successful command's one JSON document (no-op for a person).

        A failing command raises instead; the error handler emits its document.
        """
        output.out.document(envelope(self.command, True, 0, result=result))


def envelope(command: str, ok: bool, exit_code: int, **parts: Any) -> dict[str, Any]:
    """The stable shape of every --json document (documented in the README)."""
    return {"command": command, "ok": ok, "exit_code": exit_code, **parts}


def app(ctx: click.Context | None = None) -> AppContext:
    ctx = ctx or click.get_current_context()
    return ctx.ensure_object(AppContext)


def debug_enabled() -> bool:
    return os.environ.get("TOOLKIT_DEBUG", "") not in ("", "0")
