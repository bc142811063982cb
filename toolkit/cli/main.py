"""The ``toolkit`` group, its global options, and the one place errors become messages.

Every expected failure is a :class:`~toolkit.errors.ToolkitError`; :meth:`ToolkitGroup.invoke`
prints it as one line (problem, then the next step) and exits with its code. Doing this
in the group rather than in a wrapper around ``main`` means Click's ``CliRunner`` in the
tests sees exactly what an operator sees.
"""

from __future__ import annotations

import signal
import sys
import traceback

import click
from click.exceptions import NoArgsIsHelpError
from sqlalchemy.exc import DBAPIError

from toolkit import __version__, milestones, output
from toolkit.cancel import stop_in_chain
from toolkit.cli import params
from toolkit.cli.context import AppContext, app, debug_enabled, envelope
from toolkit.db import DATABASE_URL_ENV, DEFAULT_READ_TIMEOUT_S, READ_TIMEOUT_ENV
from toolkit.db_errors import classify
from toolkit.errors import (
    EXIT_CODE_MEANINGS,
    ExitCode,
    Interrupted,
    ToolkitError,
    UsageProblem,
    without_driver_internals,
)


def _exit_code_help() -> str:
    return "\n".join(f"  {int(code):>3}  {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items())


def _arity(params: list[click.Parameter]) -> dict[str, int]:
    """Each option string and how many words follow it as its value (0 for a flag)."""
    return {name: 0 if param.is_flag or param.count else param.nargs
            for param in params if isinstance(param, click.Option)
            for name in (*param.opts, *param.secondary_opts)}


def _optional_values(params: list[click.Parameter]) -> set[str]:
    """Option strings whose value may be left out (``status --watch [SECONDS]``): they take
    the next word only when it is not an option."""
    return {name for param in params if isinstance(param, click.Option)
            and getattr(param, "_flag_needs_value", False) for name in param.opts}


def global_options_first(root: click.Group, ctx: click.Context, args: list[str]) -> list[str]:
    """``args`` with the root's options (--json, -q, --database-url ...) moved ahead of the
    subcommand, wherever they were given: ``toolkit status --json`` is ``toolkit --json status``,
    for nested subcommands too (``toolkit archive status --json``).

    The words are walked as Click will parse them, down the subcommands: the value of a
    subcommand's option stays its value even when it looks like a global option
    (``fingerprint --out --json``), a subcommand's own option of the same name stays its own,
    a global option's value is the next word whatever it looks like (as Click takes it), and
    nothing after ``--`` moves. Global options keep their order, so the last one given wins.
    """
    params = root.get_params(ctx)
    globals_ = _arity([p for p in params if not p.is_eager])
    local = {name: n for name, n in _arity(params).items() if name not in globals_}
    optional: set[str] = set()
    command: click.Command = root
    moved: list[str] = []
    kept: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            kept += args[i:]
            break
        if word.startswith("-") and word != "-":
            has_value = word.startswith("--") and "=" in word
            name = word.split("=", 1)[0] if has_value else word
            arity = local.get(name, globals_.get(name))
            if name in optional and (i + 1 == len(args) or args[i + 1].startswith("-")):
                arity = 0
            taken = 1 + (0 if has_value or arity is None else arity)
            if name in local or name not in globals_:
                kept += args[i:i + taken]
            elif len(args) < i + taken:
                raise click.BadOptionUsage(name, f"Option '{name}' requires an argument.", ctx=ctx)
            else:
                moved += args[i:i + taken]
            i += taken
            continue
        if isinstance(command, click.Group):
            sub = command.get_command(ctx, word)
            if sub is not None:
                command, local = sub, _arity(sub.get_params(ctx))
                optional = _optional_values(sub.get_params(ctx))
        kept.append(word)
        i += 1
    return moved + kept


def usage_problem(exc: click.UsageError) -> UsageProblem:
    """Click's usage error as the toolkit's one line: what is wrong with which option (Click
    says it), then where to look (the option type's own next step, or the command's help)."""
    path = exc.ctx.command_path.split(" ", 1) if exc.ctx is not None else []
    command = " ".join(["toolkit", *path[1:]])
    next_step = getattr(exc, "next_step", None) or f"see `{command} --help`"
    return UsageProblem(exc.format_message(), next_step)


def _asks_for_json(args: list[str]) -> bool:
    return "--json" in (args[:args.index("--")] if "--" in args else args)


class ToolkitGroup(click.Group):
    """The root group. Every usage error, Click's (a bad value, an unknown option, a missing
    argument) like the toolkit's, is one line and exit 2, raised while the options are
    read: before anything connects, so nothing is written and no run is recorded."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is not None:
            return super().parse_args(ctx, args)
        given = list(args)
        try:
            return super().parse_args(ctx, global_options_first(self, ctx, args))
        except NoArgsIsHelpError:
            raise  # `toolkit` alone: Click's help, as it always was
        except click.UsageError as exc:
            # before the group's own callback configured the output: --json, if it was asked for
            app(ctx).json_mode = _asks_for_json(given)
            output.configure(json_mode=app(ctx).json_mode)
            _report(ctx, usage_problem(exc))
            raise  # not reached: _report exits

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise  # `toolkit archive` alone: Click's help
        except click.UsageError as exc:  # a subcommand's options, read as it is invoked
            if ctx.params.get("json_mode") and not app(ctx).json_mode:
                # `toolkit --json bogus`: Click resolves the subcommand before the group's
                # callback configures the output, so --json is taken from what was parsed.
                app(ctx).json_mode = True
                output.configure(json_mode=True, quiet=bool(ctx.params.get("quiet")))
            _report(ctx, usage_problem(exc))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except ToolkitError as exc:
            _report(ctx, exc)
        except KeyboardInterrupt:
            _report(ctx, Interrupted("Interrupted", "run the same command again to resume"))
        except BrokenPipeError:
            # Output through toolkit.output survives a closed pipe; this is a plain write
            # (click.echo): end quietly, as a program a closed pipe stops does (exit 141:
            # `toolkit sql milestone-1 | head -1`).
            output.discard(sys.stdout)
            ctx.exit(int(ExitCode.PIPE_CLOSED))
        except DBAPIError as exc:
            if debug_enabled():
                raise
            target = app(ctx)._target
            where = target.describe() if target else "the database"
            _report(ctx, classify(exc, where, output.out.secrets))
        except Exception as exc:
            if stop_in_chain(exc) is not None:  # a stop that a later error masked
                _report(ctx, Interrupted("Interrupted", "run the same command again to resume"))
            if debug_enabled():
                raise
            _report(ctx, ToolkitError(f"Unexpected error: {type(exc).__name__}: "
                                      f"{without_driver_internals(str(exc))}",
                                      "run again with TOOLKIT_DEBUG=1 and report the traceback"),
                    code=ExitCode.INTERNAL)
        finally:
            app(ctx).close()


def _report(ctx: click.Context, exc: ToolkitError, code: ExitCode | None = None) -> None:
    code = code or exc.exit_code
    state = app(ctx)
    if debug_enabled():
        traceback.print_exc()
    state.ended(int(code), {"kind": type(exc).__name__, "problem": output.out._clean(exc.problem),
                            "next_step": exc.next_step})
    if state.json_mode:
        output.out.document(envelope(
            state.command, False, int(code), database=state.database(),
            error={"kind": type(exc).__name__, "problem": output.out._clean(exc.problem),
                   "next_step": exc.next_step, "details": exc.details},
        ))
    output.out.error(exc.one_line())
    ctx.exit(int(code))


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=f"\b\nExit codes:\n{_exit_code_help()}")
@click.option("--database-url", metavar="URL",
              help=f"GitLab's PostgreSQL database (default: --gitlab-config, else ${DATABASE_URL_ENV}, "
                   "else libpq's PGHOST/PGDATABASE/PGSERVICE..., else the running sandbox). The "
                   "password is never printed.")
@click.option("--gitlab-config", metavar="PATH", expose_value=False,
              callback=lambda ctx, _, path: setattr(ctx.ensure_object(AppContext), "gitlab_config", path),
              help="GitLab's database.yml (Omnibus: /var/opt/gitlab/gitlab-rails/etc/database.yml): its "
                   "production main database, unless --database-url is given; it wins over "
                   "$TOOLKIT_DATABASE_URL and libpq's environment.")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and warnings; no progress bars.")
@click.option("--read-timeout", type=params.READ_TIMEOUT_S, default=None, metavar="SECONDS",
              help=f"statement_timeout of every read the toolkit makes (plan, verify, fingerprint, "
                   f"status, the checks around a run), set per transaction so a role's own timeout "
                   f"does not cut them off; 0 for none (default: ${READ_TIMEOUT_ENV}, else "
                   f"{DEFAULT_READ_TIMEOUT_S}).")
@click.version_option(__version__, prog_name="toolkit")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, json_mode: bool, quiet: bool,
        read_timeout: float | None) -> None:
    """Merge GitLab's Model experiments into the Model registry, safely.

    Runs the blueprint's four milestones on a live GitLab PostgreSQL database with a
    dry run that writes nothing, batched resumable apply, verify and rollback.

    Example: toolkit demo
    """
    state = ctx.ensure_object(AppContext)
    state.database_url = database_url
    state.json_mode = json_mode
    state.quiet = quiet
    state.read_timeout_s = read_timeout
    state.command = ctx.invoked_subcommand or ""
    output.configure(json_mode=json_mode, quiet=quiet)


class SubcommandHelp:
    """What every subcommand's ``--help`` adds to Click's: the milestones its MILESTONE
    takes (with their short aliases, ``1`` for ``milestone-1``), and the global options,
    which work after the subcommand too (``toolkit status --json``) but which Click would
    show only in ``toolkit --help``. Mixed into each subcommand's class when it is
    registered, so no command module has to remember it."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)  # type: ignore[misc]
        if any(getattr(p, "metavar", None) and "MILESTONE" in str(p.metavar)
               for p in self.get_params(ctx)):  # type: ignore[attr-defined]
            with formatter.section("Milestones (MILESTONE)"):
                formatter.write_dl([(f"{m.name}, {number}", m.title)
                                    for number, m in enumerate(milestones.REGISTRY, start=1)])
        root = click.Context(cli, info_name="toolkit")  # the root's, even for a help built alone
        records = [record for p in cli.get_params(root) if not p.is_eager
                   and (record := p.get_help_record(root)) is not None]
        if records:
            with formatter.section("Global options (before or after the subcommand)"):
                formatter.write_dl(records)


def _with_subcommand_help(command: click.Command) -> None:
    if not isinstance(command, SubcommandHelp):
        command.__class__ = type(command.__class__.__name__, (SubcommandHelp, command.__class__), {})
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _with_subcommand_help(sub)


def _register() -> None:
    from toolkit.cli import (
        adopt,
        archive,
        control,
        demo,
        fingerprint,
        migrate,
        mlflow,
        report,
        sandbox,
        sql,
    )

    for command in (migrate.status, migrate.plan, migrate.migrate, migrate.verify, migrate.rollback,
                    sql.sql, migrate.history, fingerprint.fingerprint, archive.archive,
                    report.report, sandbox.sandbox, demo.demo, mlflow.mlflow, adopt.adopt,
                    control.control):
        _with_subcommand_help(command)
        cli.add_command(command)
    from toolkit.cli.fleet import fleet

    _with_subcommand_help(fleet)
    cli.add_command(fleet)


_register()


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM stops a command as Ctrl-C does (exit 130, a run's history `interrupted`), not
    # by the default action that leaves no word; a run's batches handle both themselves
    # (engine/signals.py) and `mlflow serve` its own.
    signal.signal(signal.SIGTERM, _terminated)
    cli(prog_name="toolkit")
