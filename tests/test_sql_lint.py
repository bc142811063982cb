"""The SQL `toolkit sql` prints for a DBA passes squawk, and is the SQL the engine runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.cli.main import cli
from toolkit.milestones import MILESTONES

ROOT = Path(__file__).resolve().parent.parent


def _squawk() -> str:
    found = shutil.which("squawk") or str(Path(sys.executable).parent / "squawk")
    assert Path(found).exists(), "squawk-cli is part of the test extra: pip install -e '.[test]'"
    return found


@pytest.mark.parametrize("milestone", list(MILESTONES))
@pytest.mark.parametrize("rollback", [False, True])
def test_sql_passes_squawk(tmp_path, milestone, rollback):
    args = ["sql", milestone, *(["--rollback"] if rollback else [])]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0
    path = tmp_path / f"{milestone}{'-rollback' if rollback else ''}.sql"
    path.write_text(result.output)
    lint = subprocess.run([_squawk(), "--config", str(ROOT / ".squawk.toml"), "--reporter", "gcc", str(path)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "lock_timeout = '" in result.output


def test_sql_has_no_named_placeholders_left():
    for milestone in MILESTONES:
        text = CliRunner().invoke(cli, ["sql", milestone]).output
        body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
        assert ":lo" not in body and ":hi" not in body and ":run_id" not in body


@pytest.mark.parametrize("rollback", [False, True])
def test_each_statement_carries_the_timeouts_the_toolkit_runs_it_with(rollback):
    """A schema change waits 100 ms for its lock, not a batch's 2 s: the script says so
    statement by statement, and resets a session setting right after its change."""
    from toolkit.engine.settings import RunOptions

    defaults = RunOptions()
    for milestone in MILESTONES:
        text = CliRunner().invoke(cli, ["sql", milestone, *(["--rollback"] if rollback else [])]).output
        blocks = text.split(f"-- {milestone} / ")[1:]
        assert blocks
        for block in blocks:
            if "Runs in batches" in block:
                assert f"SET LOCAL lock_timeout = '{defaults.lock_timeout_ms}ms';" in block, block
                assert f"SET LOCAL statement_timeout = '{defaults.statement_timeout_ms}ms';" in block
                assert block.rstrip().endswith("COMMIT;")
            else:
                assert "Schema change" in block, block
                head = block.index(f"SET lock_timeout = '{defaults.ddl_lock_timeout_ms}ms';")
                assert head < block.index("BEGIN;") if "BEGIN;" in block else True
                assert block.rstrip().endswith("RESET lock_timeout;\nRESET statement_timeout;"), block
        assert "'2s'" not in text and f"SET lock_timeout = '{defaults.lock_timeout_ms}ms'" not in text
