"""The generated child pipeline run for real by gitlab-ci-local (shell executor) on the
test server's databases: the canary, then two waves; a database that is not GitLab's
fails its own job with its exit code; a failing canary stops every later wave
(tests/gitlab_ci_local.py says which gitlab-ci-local, and when these tests skip)."""

from __future__ import annotations

import json
import subprocess

from gitlab_ci_local import TOOLKIT, gitlab_ci_local, project, run


def _state(db, milestone: str) -> str | None:
    if not db.scalar("SELECT to_regclass('toolkit.milestones') IS NOT NULL"):
        return None
    return db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = :m", m=milestone)


def test_the_child_pipeline_runs_the_waves_and_a_failing_canary_stops_them(tmp_path, make_database):
    binary = gitlab_ci_local()
    gitlab = [make_database("realistic:small") for _ in range(8)]
    not_gitlab = make_database("empty")
    names = ["canary"] + [f"w1-{i}" for i in range(1, 5)] + [f"w2-{i}" for i in range(1, 4)]
    variables = {f"URL_{i}": db.url_text for i, db in enumerate(gitlab)} | {"URL_EMPTY": not_gitlab.url_text}
    entries = [f"  - {{name: {name}, url_env: URL_{i}, wave: {name.split('-')[0]}}}\n"
               for i, name in enumerate(names)]
    inventory = ("waves: [canary, {name: w1, max_parallel: 2}, {name: w2, max_parallel: 4}]\ndatabases:\n"
                 + "".join(entries) + "  - {name: not-gitlab, url_env: URL_EMPTY, wave: w2}\n")
    proj = project(tmp_path / "fleet", inventory, variables, "milestone-1", "--", "--reconnect", "2")
    ran = run(binary, proj)
    said = ran.stdout + ran.stderr
    # wave 1's four databases ran as two stages of two (max_parallel), in order
    stages = [line.split(" starting shell ")[1].strip() for line in ran.stdout.splitlines()
              if " starting shell " in line]
    assert stages == ["(canary)", "(w1 1/2)", "(w1 1/2)", "(w1 2/2)", "(w1 2/2)", *["(w2)"] * 4,
                      "(fleet report)"], said[-3000:]
    for i, db in enumerate(gitlab):
        assert _state(db, "milestone-1") == "verified", (names[i], said[-3000:])
    assert _state(not_gitlab, "milestone-1") is None
    record = json.loads((proj / "fleet-artifacts" / "not-gitlab" / "job.json").read_text())
    assert record["exit_code"] == 3 and "does not look like GitLab" in record["error"]
    # the pipeline's own last job merged the artifacts and names the failed database
    report = json.loads((proj / "fleet-report" / "fleet-report.json").read_text())
    assert report["totals"] | {"rows": 0, "job_seconds": 0, "wall_seconds": 0, "throttled_seconds": 0} == {
        "databases": 9, "succeeded": 8, "failed": 1, "not_run": 0, "rows": 0, "job_seconds": 0,
        "wall_seconds": 0, "throttled_seconds": 0}
    assert [r["database"] for r in report["databases"] if r["status"] == "failed"] == ["not-gitlab"]
    assert "- failed: not-gitlab" in (proj / "fleet-report" / "summary.md").read_text()
    starts = {r["database"]: r["started_at"] for r in report["databases"]}
    assert starts["canary"] < min(starts[n] for n in names[1:])
    assert max(starts[n] for n in names[1:5]) < min(starts[n] for n in [*names[5:], "not-gitlab"])

    # A failing canary: the database that is not GitLab's goes first for milestone 2; its job
    # fails with exit 3 and GitLab (here gitlab-ci-local) runs none of the waves after it.
    stop = inventory.replace("  - {name: canary, url_env: URL_0, wave: canary}\n", "") \
        .replace("{name: not-gitlab, url_env: URL_EMPTY, wave: w2}", "{name: not-gitlab, url_env: URL_EMPTY, "
                                                                     "wave: canary}")
    proj = project(tmp_path / "stop", stop, variables, "milestone-2")
    ran = run(binary, proj)
    assert ran.returncode != 0
    assert json.loads((proj / "fleet-artifacts" / "not-gitlab" / "job.json").read_text())["exit_code"] == 3
    assert sorted(p.name for p in (proj / "fleet-artifacts").iterdir()) == ["not-gitlab"]
    for db in gitlab:
        assert _state(db, "milestone-2") is None  # never started: no job of a later wave ran
    # gitlab-ci-local runs no `when: always` job after skipped ones (GitLab does): the report
    # is made here from the same artifacts, as the pipeline's last job would.
    merged = subprocess.run([TOOLKIT, "--json", "fleet", "report", "fleet-artifacts", "--inventory", "fleet.yml"],
                            cwd=proj, capture_output=True, text=True, timeout=60)
    assert merged.returncode == 1
    totals = json.loads(merged.stdout)["result"]["totals"]
    assert (totals["failed"], totals["not_run"], totals["succeeded"]) == (1, 7, 0)
