"""Write docs/cli.md, the command reference, from the Click command tree.

    .venv/bin/python scripts/cli_docs.py           # rewrite docs/cli.md
    .venv/bin/python scripts/cli_docs.py --check   # exit 1 when docs/cli.md is stale

Every command and subcommand's ``--help``, in the order ``--help`` lists them, rendered
at a fixed width (80 columns) so the file is the same on every terminal and machine.
A plain script rather than cog: the whole file is generated, there is no hand-written
prose between generated blocks to keep, so a marker-based tool would add a dependency
for nothing; tests/test_docs.py fails when the file is stale.

The help is rendered as a user other than root sees it with no TOOLKIT_* variable set:
the sandbox's default directory is the one help text that depends on who runs it (as root
it is machine-wide), so it is fixed here before the commands are imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import click

OUT = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = 80
REGENERATE = ".venv/bin/python scripts/cli_docs.py"


def _fixed_environment() -> None:
    """What the help may read from its surroundings, made the same everywhere: no TOOLKIT_*
    variable, and the sandbox's default directory a non-root user's, as ``~`` rather than
    this machine's home. Must run before ``toolkit.cli`` is imported."""
    for name in [n for n in os.environ if n.startswith("TOOLKIT_")]:
        del os.environ[name]
    from toolkit.sandbox import server

    if not hasattr(server, "_default_without_env"):  # renamed: the help would show this machine's
        raise SystemExit("scripts/cli_docs.py: toolkit.sandbox.server._default_without_env is gone; "
                         "fix _fixed_environment()")
    server._default_without_env = lambda: Path("~/.local/share/toolkit/sandbox")


def _walk(command: click.Command, path: tuple[str, ...], parent: click.Context | None):
    ctx = click.Context(command, info_name=path[-1], parent=parent,
                        terminal_width=WIDTH, max_content_width=WIDTH)
    yield path, command.get_help(ctx)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, (*path, name), ctx)


def render() -> str:
    """The whole of docs/cli.md."""
    _fixed_environment()
    from toolkit.cli.main import cli

    helps = list(_walk(cli, ("toolkit",), None))
    lines = ["# Command reference", "",
             f"<!-- Generated from the Click command tree by scripts/cli_docs.py; do not edit. "
             f"Regenerate with `{REGENERATE}`. -->", "",
             f"Every command's `--help`, as printed at {WIDTH} columns. The sandbox's default "
             "directory is shown as a user other than root sees it (as root it is "
             "`/var/lib/toolkit/sandbox`, shared by every root session).", ""]
    lines += [f"- [`{' '.join(path)}`](#{'-'.join(path)})" for path, _ in helps]
    for path, text in helps:
        lines += ["", f"## {' '.join(path)}", "", "```text", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1, writing nothing, when docs/cli.md differs from the help")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing the file")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    elif args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(OUT.parents[1])} is stale: run `{REGENERATE}` and commit it.",
                  file=sys.stderr)
            return 1
    else:
        OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
