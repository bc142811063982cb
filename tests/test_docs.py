"""The docs hold together: docs/cli.md is the help the commands print now, and every
relative link in README.md, CONTRIBUTING.md and docs/ leads to a file (and heading) that
exists. The README is split by reader, so a moved section must leave no dangling link."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
CLI_DOCS = ROOT / "docs" / "cli.md"
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def _docs() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(path: Path) -> str:
    """The file without its fenced code blocks: a `# comment` in a shell example is no
    heading, and a `[x](y)` in one is no link."""
    return FENCE.sub("", path.read_text())


def _anchors(path: Path) -> set[str]:
    """Each heading's anchor as GitHub makes it: lower case, punctuation but `-` and `_`
    dropped, spaces as hyphens, a repeated one numbered."""
    anchors: set[str] = set()
    for heading in HEADING.findall(_prose(path)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_docs_cli_md_is_the_help_the_commands_print():
    """Regenerated in a process of its own, at another terminal width and with the sandbox
    elsewhere: the same file, so the width is fixed and the file holds no one's machine."""
    env = {**os.environ, "COLUMNS": "37", "TOOLKIT_SANDBOX_DIR": str(ROOT / "elsewhere")}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_docs.py"), "--stdout"],
                            capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert CLI_DOCS.exists() and result.stdout == CLI_DOCS.read_text(), (
        "docs/cli.md is stale: run `.venv/bin/python scripts/cli_docs.py` and commit docs/cli.md")


def test_docs_cli_md_shows_every_command():
    import click

    from toolkit.cli.main import cli

    def walk(command: click.Command, path: tuple[str, ...]):
        yield " ".join(path)
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=path[-1])
            for name in command.list_commands(ctx):
                yield from walk(command.get_command(ctx, name), (*path, name))

    headings = [h for h in HEADING.findall(_prose(CLI_DOCS)) if h.startswith("toolkit")]
    assert headings == list(walk(cli, ("toolkit",)))


def test_every_relative_link_in_the_docs_leads_somewhere():
    broken = []
    for doc in _docs():
        for target in LINK.findall(_prose(doc)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT)}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_short_and_leads_to_each_doc():
    """Under 200 lines, and every doc in docs/ (the benchmark's README for its directory)
    is linked from it, so nothing moved out of it is out of reach."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(ROOT / "README.md"))}
    docs = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "docs" / "benchmarks" / "README.md",
            ROOT / "CONTRIBUTING.md"]
    assert [d.relative_to(ROOT) for d in docs if d.resolve() not in linked] == []


def test_the_readme_s_toolkit_commands_are_commands_the_toolkit_takes():
    """Each `toolkit …` line of the README's shell blocks, as written, against a URL where
    nothing listens: no usage error (2), and the refusal is that the database cannot be
    reached (5), so the command, its milestone and its options were all taken."""
    from click.testing import CliRunner

    from toolkit.cli.main import cli
    from toolkit.errors import ExitCode

    blocks = re.findall(r"^```sh\n(.*?)^```", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    lines = [line.split("#")[0].split() for block in blocks for line in block.splitlines()]
    commands = [words[1:] for words in lines if words[:1] == ["toolkit"]]
    assert len(commands) >= 5, commands
    for args in commands:
        result = CliRunner().invoke(cli, ["--database-url", "postgresql://toolkit@127.0.0.1:1/nowhere",
                                          *args])
        assert result.exit_code == ExitCode.DATABASE, (args, result.output)
