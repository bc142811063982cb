"""The generated child pipeline run for real by gitlab-ci-local (shell executor) on the
test server's databases: the canary, then two waves; a database that is not GitLab's
fails its own job with its exit code; a failing canary stops every later wave.

gitlab-ci-local honours stages, artifacts and ``allow_failure`` but not ``resource_group``
nor ``retry`` (those two are checked in the YAML by tests/test_fleet_pipeline.py). It is
an npm package: `.ci/run` installs the pinned release (GITLAB_CI_LOCAL_VERSION below, the
newest that runs on Node 20) into .ci/node; without it, or without git and rsync (which
it calls), these tests are skipped saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

GITLAB_CI_LOCAL_VERSION = "4.73.0"
ENV = "TOOLKIT_TEST_GITLAB_CI_LOCAL"
ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "gitlab-ci-local"
TOOLKIT = str(Path(sys.executable).parent / "toolkit")
HOW = (f"run `bash .ci/run`, or `npm install --prefix .ci/node gitlab-ci-local@{GITLAB_CI_LOCAL_VERSION}` "
       f"and `apt-get install rsync git` (or set {ENV} to its path)")


def _gitlab_ci_local() -> str:
    found = os.environ.get(ENV) or (str(BUNDLED) if BUNDLED.exists() else None)
    if not found:
        pytest.skip(f"gitlab-ci-local is not installed: {HOW}")
    for tool in ("git", "rsync", "node"):
        if shutil.which(tool) is None:
            pytest.skip(f"gitlab-ci-local needs {tool}, which is not installed: {HOW}")
    return found


def _project(path: Path, inventory: str, variables: dict[str, str], *pipeline_args: str) -> Path:
    """A git repository holding the inventory and the child pipeline, as GitLab checks
    out for the child pipeline's jobs; the URLs as CI/CD variables."""
    path.mkdir()
    (path / "fleet.yml").write_text(inventory)
    (path / ".gitlab-ci-local-variables.yml").write_text(yaml.safe_dump(variables))
    generated = subprocess.run([TOOLKIT, "fleet", "pipeline", "--inventory", "fleet.yml", "--toolkit", TOOLKIT,
                                "--out", "fleet-pipeline.yml", *pipeline_args],
                               cwd=path, capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    git = ["git", "-c", "user.name=fleet", "-c", "user.email=fleet@example.invalid"]
    for words in (["init", "-q", "-b", "main"], ["add", "fleet.yml", "fleet-pipeline.yml"], ["commit", "-qm", "fleet"]):
        subprocess.run([*git, *words], cwd=path, check=True, capture_output=True, timeout=30)
    return path


def _run(binary: str, project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--file", "fleet-pipeline.yml", "--no-color", "--home", str(project / ".home"),
                           "--concurrency", "4", *args],
                          cwd=project, capture_output=True, text=True, timeout=240)


def _state(db, milestone: str) -> str | None:
    if not db.scalar("SELECT to_regclass('toolkit.milestones') IS NOT NULL"):
        return None
    return db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = :m", m=milestone)


def test_the_child_pipeline_runs_the_waves_and_a_failing_canary_stops_them(tmp_path, make_database):
    binary = _gitlab_ci_local()
    gitlab = [make_database("realistic:small") for _ in range(8)]
    not_gitlab = make_database("empty")
    names = ["canary"] + [f"w1-{i}" for i in range(1, 5)] + [f"w2-{i}" for i in range(1, 4)]
    variables = {f"URL_{i}": db.url_text for i, db in enumerate(gitlab)} | {"URL_EMPTY": not_gitlab.url_text}
    entries = [f"  - {{name: {name}, url_env: URL_{i}, wave: {name.split('-')[0]}}}\n"
               for i, name in enumerate(names)]
    inventory = ("waves: [canary, {name: w1, max_parallel: 2}, {name: w2, max_parallel: 4}]\ndatabases:\n"
                 + "".join(entries) + "  - {name: not-gitlab, url_env: URL_EMPTY, wave: w2}\n")
    project = _project(tmp_path / "fleet", inventory, variables, "milestone-1", "--", "--reconnect", "2")
    ran = _run(binary, project)
    said = ran.stdout + ran.stderr
    # wave 1's four databases ran as two stages of two (max_parallel), in order
    stages = [line.split(" starting shell ")[1].strip() for line in ran.stdout.splitlines()
              if " starting shell " in line]
    assert stages == ["(canary)", "(w1 1/2)", "(w1 1/2)", "(w1 2/2)", "(w1 2/2)", *["(w2)"] * 4,
                      "(fleet report)"], said[-3000:]
    for i, db in enumerate(gitlab):
        assert _state(db, "milestone-1") == "verified", (names[i], said[-3000:])
    assert _state(not_gitlab, "milestone-1") is None
    record = json.loads((project / "fleet-artifacts" / "not-gitlab" / "job.json").read_text())
    assert record["exit_code"] == 3 and "does not look like GitLab" in record["error"]
    # the pipeline's own last job merged the artifacts and names the failed database
    report = json.loads((project / "fleet-report" / "fleet-report.json").read_text())
    assert report["totals"] | {"rows": 0, "job_seconds": 0, "wall_seconds": 0, "throttled_seconds": 0} == {
        "databases": 9, "succeeded": 8, "failed": 1, "not_run": 0, "rows": 0, "job_seconds": 0,
        "wall_seconds": 0, "throttled_seconds": 0}
    assert [r["database"] for r in report["databases"] if r["status"] == "failed"] == ["not-gitlab"]
    assert "- failed: not-gitlab" in (project / "fleet-report" / "summary.md").read_text()
    starts = {r["database"]: r["started_at"] for r in report["databases"]}
    assert starts["canary"] < min(starts[n] for n in names[1:])
    assert max(starts[n] for n in names[1:5]) < min(starts[n] for n in [*names[5:], "not-gitlab"])

    # A failing canary: the database that is not GitLab's goes first for milestone 2; its job
    # fails with exit 3 and GitLab (here gitlab-ci-local) runs none of the waves after it.
    stop = inventory.replace("  - {name: canary, url_env: URL_0, wave: canary}\n", "") \
        .replace("{name: not-gitlab, url_env: URL_EMPTY, wave: w2}", "{name: not-gitlab, url_env: URL_EMPTY, "
                                                                     "wave: canary}")
    project = _project(tmp_path / "stop", stop, variables, "milestone-2")
    ran = _run(binary, project)
    assert ran.returncode != 0
    assert json.loads((project / "fleet-artifacts" / "not-gitlab" / "job.json").read_text())["exit_code"] == 3
    assert sorted(p.name for p in (project / "fleet-artifacts").iterdir()) == ["not-gitlab"]
    for db in gitlab:
        assert _state(db, "milestone-2") is None  # never started: no job of a later wave ran
    # gitlab-ci-local runs no `when: always` job after skipped ones (GitLab does): the report
    # is made here from the same artifacts, as the pipeline's last job would.
    merged = subprocess.run([TOOLKIT, "--json", "fleet", "report", "fleet-artifacts", "--inventory", "fleet.yml"],
                            cwd=project, capture_output=True, text=True, timeout=60)
    assert merged.returncode == 1
    totals = json.loads(merged.stdout)["result"]["totals"]
    assert (totals["failed"], totals["not_run"], totals["succeeded"]) == (1, 7, 0)
