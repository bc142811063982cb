"""``toolkit fleet plan`` and the inventory it reads, on real databases of the test server."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from toolkit.cli.main import cli
from toolkit.fleet import inventory


def _fleet(tmp_path, text: str):
    path = tmp_path / "fleet.yml"
    path.write_text(text)
    return path


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the inventory --------------------------------------------------------------------

GOOD = """
max_parallel: 2
waves: [canary, {name: wave-1, max_parallel: 3}]
databases:
  - {name: cell-2, url_env: CELL_2_URL, wave: wave-1, tags: [eu]}
  - {name: cell-1, service: gitlab-cell-1, wave: canary}
  - {name: cell-3, gitlab_config: /etc/gitlab/database.yml, wave: wave-1}
"""


def test_inventory_reads_waves_in_order_canary_first(tmp_path):
    fleet = inventory.load(_fleet(tmp_path, GOOD))
    assert [w.name for w in fleet.waves] == ["canary", "wave-1"]
    assert [(w.max_parallel, w.on_error) for w in fleet.waves] == [(2, "stop"), (3, "continue")]
    assert [d.name for d in fleet.databases] == ["cell-1", "cell-2", "cell-3"]
    assert fleet.get("cell-2").tags == ("eu",)
    assert [(d.source, d.value) for d in fleet.databases] == [
        ("service", "gitlab-cell-1"), ("url_env", "CELL_2_URL"), ("gitlab_config", "/etc/gitlab/database.yml")]


@pytest.mark.parametrize(("entry", "said"), [
    ("{name: cell-1, url: 'postgresql://u:hunter2@h/db'}", "database cell-1: field url: the inventory never "
                                                          "holds a password"),
    ("{name: cell-1, password: hunter2, service: s}", "database cell-1: field password: the inventory never"),
    ("{name: cell-1, url_env: 'postgresql://u:hunter2@h/db'}", "database cell-1: field url_env: "),
    ("{name: cell-1}", "database cell-1: field url_env/service/gitlab_config: give exactly one"),
    ("{name: cell-1, service: a, url_env: B}", "database cell-1: field url_env/service/gitlab_config"),
    ("{name: Cell_1, service: a}", "database Cell_1: field name: "),
    ("{name: cell-1, service: a, wave: nope}", "database cell-1: field wave: 'nope' is not one of"),
    ("{name: cell-1, service: a, colour: red}", "database cell-1: unknown field 'colour'"),
    ("{name: cell-1, service: a, tags: eu}", "database cell-1: field tags: must be a list"),
])
def test_a_bad_entry_is_one_line_naming_the_database_and_field(tmp_path, entry, said):
    path = _fleet(tmp_path, f"waves: [canary]\ndatabases:\n  - {entry}\n")
    result = run("fleet", "plan", "--inventory", str(path))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], lines
    assert "hunter2" not in result.output + result.stderr


def test_a_missing_inventory_and_bad_yaml_are_usage_errors(tmp_path):
    result = run("fleet", "plan", "--inventory", str(tmp_path / "nope.yml"))
    assert result.exit_code == 2 and "nope.yml does not exist" in result.stderr
    result = run("fleet", "plan", "--inventory", str(_fleet(tmp_path, "databases: [\n")))
    assert result.exit_code == 2 and "is not valid YAML (line" in result.stderr


def test_names_and_max_parallel_are_checked(tmp_path):
    twice = "databases:\n  - {name: a, service: s}\n  - {name: a, service: t}\n"
    result = run("fleet", "plan", "--inventory", str(_fleet(tmp_path, twice)))
    assert result.exit_code == 2 and "database a: field name: given twice" in result.stderr
    zero = "waves: [{name: w, max_parallel: 0}]\ndatabases:\n  - {name: a, service: s, wave: w}\n"
    result = run("fleet", "plan", "--inventory", str(_fleet(tmp_path, zero)))
    assert result.exit_code == 2 and "wave w: field max_parallel: must be a whole number" in result.stderr


# -- the plan ---------------------------------------------------------------------------


def test_fleet_plan_reads_every_database_and_reports_the_broken_ones_as_rows(
        tmp_path, make_database, milestone_states, pg_server):
    fresh = [make_database("realistic:small") for _ in range(3)]
    done_m1 = make_database(like=milestone_states.before("realistic", 2))
    not_gitlab = make_database("empty")
    env = {f"DB_{i}": db.url_text for i, db in enumerate([*fresh, done_m1, not_gitlab])}
    env["DB_DOWN"] = f"postgresql://nobody:s3cret-pw@127.0.0.1:{_closed_port()}/gitlab?connect_timeout=3"
    path = _fleet(tmp_path, """
waves: [canary, wave-1]
databases:
  - {name: canary-db, url_env: DB_0, wave: canary}
  - {name: fresh-1, url_env: DB_1, wave: wave-1}
  - {name: fresh-2, url_env: DB_2, wave: wave-1}
  - {name: done-m1, url_env: DB_3, wave: wave-1}
  - {name: not-gitlab, url_env: DB_4, wave: wave-1}
  - {name: down, url_env: DB_DOWN, wave: wave-1}
  - {name: unset, url_env: DB_NOT_SET, wave: wave-1}
""")
    result = run("fleet", "plan", "--inventory", str(path), "--concurrency", "4", "--json", env=env)
    doc = json.loads(result.stdout)
    rows = {r["database"]: r for r in doc["result"]["databases"]}
    assert list(rows) == ["canary-db", "fresh-1", "fresh-2", "done-m1", "not-gitlab", "down", "unset"]
    for name in ("canary-db", "fresh-1", "fresh-2"):
        assert rows[name]["exit_code"] == 0 and rows[name]["error"] is None
        assert rows[name]["states"]["milestone-1"] == "not started"
        assert rows[name]["next_milestone"] == "milestone-1"
        assert rows[name]["rows_to_change"] > 0
    # the same library call as `toolkit plan milestone-1`: the same count
    single = run("--database-url", fresh[1].url_text, "--json", "plan", "milestone-1")
    assert json.loads(single.stdout)["result"]["milestones"][0]["rows"] == rows["fresh-1"]["rows_to_change"]
    assert rows["done-m1"]["states"]["milestone-1"] == "verified"
    assert rows["done-m1"]["next_milestone"] == "milestone-2"
    # done-m1's own runs give a measured rate; the others are estimated from the fleet's
    assert rows["done-m1"]["measured_rows_per_s"] > 0
    assert rows["fresh-1"]["estimate_s"] is not None and rows["fresh-1"]["estimate_from"].startswith("fleet")
    assert rows["not-gitlab"]["exit_code"] == 3 and rows["not-gitlab"]["error"]
    assert rows["down"]["exit_code"] == 5 and "127.0.0.1" in rows["down"]["error"]
    assert rows["unset"]["exit_code"] == 2 and "$DB_NOT_SET is not set" in rows["unset"]["error"]
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert result.exit_code == 3 and doc["ok"] is False and doc["exit_code"] == 3
    # a person's table: one line per database, the errors in it
    text = run("fleet", "plan", "--inventory", str(path), env=env)
    assert text.exit_code == 3
    lines = [line for line in text.stdout.splitlines() if line.split()[:1]
             and line.split()[0] in rows]
    assert [line.split()[0] for line in lines] == list(rows)
    print(text.stdout)
    assert "4 of 7 databases planned; not planned: not-gitlab, down, unset" in text.stdout


def test_the_global_database_options_are_refused_the_inventory_names_the_databases(tmp_path):
    path = _fleet(tmp_path, GOOD)
    for given in (["--database-url", "postgresql://u:hunter2@h/db"], ["--gitlab-config", "/etc/x.yml"]):
        result = run(*given, "fleet", "plan", "--inventory", str(path))
        assert result.exit_code == 2, result.output
        assert "do not apply to `toolkit fleet`" in result.stderr and "hunter2" not in result.stderr
