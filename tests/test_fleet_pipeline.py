"""``toolkit fleet pipeline``, ``job`` and ``report``: the YAML checked against GitLab's CI
schema, and one database's job and the merged report on real databases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import yaml
from click.testing import CliRunner

from toolkit.cli.main import cli

CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

INVENTORY = """
waves: [canary, {name: wave-1, max_parallel: 2}, {name: wave-2, max_parallel: 3, on_error: stop}]
databases:
  - {name: c1, url_env: C1_URL, wave: canary}
  - {name: a1, url_env: A1_URL, wave: wave-1}
  - {name: a2, service: gitlab-a2, wave: wave-1}
  - {name: a3, gitlab_config: /etc/gitlab/a3.yml, wave: wave-1}
  - {name: b1, url_env: B1_URL, wave: wave-2}
"""


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def _schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.gitlab-ci", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_the_pipeline_is_valid_gitlab_ci_with_waves_caps_retries_and_a_stop_rule(tmp_path):
    (tmp_path / "fleet.yml").write_text(INVENTORY)
    out = tmp_path / "child.yml"
    result = run("fleet", "pipeline", "--inventory", str(tmp_path / "fleet.yml"), "--out", str(out),
                 "milestone-2", "--", "--reconnect", "3")
    assert result.exit_code == 0, result.output
    checked = _schema_check(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    doc = yaml.safe_load(out.read_text())
    # canary first; wave-1's three databases cut into stages of at most two; the report last
    assert doc["stages"] == ["canary", "wave-1 1/2", "wave-1 2/2", "wave-2", "fleet report"]
    jobs = {name: job for name, job in doc.items() if isinstance(job, dict) and "stage" in job}
    assert [jobs[f"milestone-2 {n}"]["stage"] for n in ("c1", "a1", "a2", "a3", "b1")] == \
        ["canary", "wave-1 1/2", "wave-1 1/2", "wave-1 2/2", "wave-2"]
    for name in ("c1", "a1", "a2", "a3", "b1"):
        job = jobs[f"milestone-2 {name}"]
        assert job["resource_group"] == f"toolkit-fleet-{name}"  # one job at a time per database
        assert job["retry"] == {"max": 2, "exit_codes": [4, 6, 7, 75]}  # resumable codes only
        assert job["script"] == [f"toolkit fleet job --inventory {tmp_path}/fleet.yml --database {name} "
                                 "--out fleet-artifacts milestone-2 -- --reconnect 3"]
        assert job["artifacts"]["when"] == "always"
        assert job["artifacts"]["reports"]["junit"] == f"fleet-artifacts/{name}/junit.xml"
    # the canary and the `stop` wave may not fail: GitLab skips every later stage when they do
    assert "allow_failure" not in jobs["milestone-2 c1"] and "allow_failure" not in jobs["milestone-2 b1"]
    assert all(jobs[f"milestone-2 {n}"]["allow_failure"] is True for n in ("a1", "a2", "a3"))
    assert jobs["fleet report"]["when"] == "always"
    # rollback jobs, and the schema check is not a formality: GitLab allows at most 2 retries
    rollback = run("fleet", "pipeline", "--inventory", str(tmp_path / "fleet.yml"), "rollback", "milestone-2",
                   "--retries", "0")
    back = yaml.safe_load(rollback.stdout)
    assert "rollback milestone-2 c1" in back and "retry" not in back["rollback milestone-2 c1"]
    assert "--database c1 --out fleet-artifacts rollback milestone-2" in back["rollback milestone-2 c1"]["script"][0]
    # --json: one document, the YAML in it
    as_json = run("--json", "fleet", "pipeline", "--inventory", str(tmp_path / "fleet.yml"), "milestone-2")
    listed = json.loads(as_json.stdout)["result"]
    assert yaml.safe_load(listed["yaml"])["stages"] == doc["stages"] and "milestone-2 a3" in listed["jobs"]
    doc["milestone-2 c1"]["retry"]["max"] = 3
    out.write_text(yaml.safe_dump(doc))
    assert _schema_check(out).returncode != 0


def test_pipeline_refuses_an_unknown_milestone_and_a_missing_one(tmp_path):
    (tmp_path / "fleet.yml").write_text(INVENTORY)
    for words in (["milestone-9"], [], ["rollback"], ["milestone-1", "--", "--reconect", "3"],
                  ["rollback", "milestone-1", "--", "--batch-size", "0"]):
        result = run("fleet", "pipeline", "--inventory", str(tmp_path / "fleet.yml"), *words)
        assert result.exit_code == 2, (words, result.output)
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_job_runs_one_database_and_the_report_merges_the_fleet(tmp_path, make_database):
    good = make_database("realistic:small")
    not_gitlab = make_database("empty")
    (tmp_path / "fleet.yml").write_text("""
waves: [canary, wave-1]
databases:
  - {name: good, url_env: GOOD_URL, wave: canary}
  - {name: not-gitlab, url_env: EMPTY_URL, wave: wave-1}
  - {name: skipped, url_env: NEVER_URL, wave: wave-1}
""")
    env = {"GOOD_URL": good.url_text, "EMPTY_URL": not_gitlab.url_text}
    inventory = str(tmp_path / "fleet.yml")
    artifacts = tmp_path / "fleet-artifacts"
    ok = run("fleet", "job", "--inventory", inventory, "--database", "good", "--out", str(artifacts),
             "milestone-1", env=env)
    assert ok.exit_code == 0, ok.output
    assert good.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-1'") == "verified"
    record = json.loads((artifacts / "good" / "job.json").read_text())
    assert record["state_before"] == "not started" and record["state_after"] == "verified"
    assert record["rows"] > 0 and record["verify_ok"] is True and record["exit_code"] == 0
    report = json.loads((artifacts / "good" / "report.json").read_text())
    assert report["command"] == "migrate" and report["ok"] is True
    assert good.url_text not in (artifacts / "good" / "log.txt").read_text()
    events = [json.loads(line) for line in (artifacts / "good" / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end", events
    assert sum(e["rows"] for e in events if e["event"] == "batch") == record["rows"]

    bad = run("fleet", "job", "--inventory", inventory, "--index", "1", "--out", str(artifacts),
              "milestone-1", env=env)
    assert bad.exit_code == 3  # the toolkit's own refusal of a database that is not GitLab's
    failed = json.loads((artifacts / "not-gitlab" / "job.json").read_text())
    assert failed["exit_code"] == 3 and "does not look like GitLab" in failed["error"]
    case = ET.parse(artifacts / "not-gitlab" / "junit.xml").find(".//testcase/failure")
    assert case is not None and case.get("type") == "exit 3"

    merged = run("fleet", "report", str(artifacts), "--inventory", inventory, "--out", str(tmp_path / "r"),
                 "--json")
    assert merged.exit_code == 1
    doc = json.loads(merged.stdout)["result"]
    by_name = {r["database"]: r for r in doc["databases"]}
    assert [r["database"] for r in doc["databases"]] == ["good", "not-gitlab", "skipped"]
    assert by_name["skipped"]["status"] == "not run"
    assert doc["totals"] | {"job_seconds": 0, "wall_seconds": 0} == {
        "databases": 3, "succeeded": 1, "failed": 1, "not_run": 1, "rows": record["rows"],
        "job_seconds": 0, "wall_seconds": 0, "throttled_seconds": 0}
    assert doc["waves"]["wave-1"]["failed"] == 1 and doc["waves"]["canary"]["succeeded"] == 1
    suites = ET.parse(tmp_path / "r" / "junit.xml").getroot()
    assert [(s.get("name"), s.get("tests"), s.get("failures"), s.get("skipped")) for s in suites] == \
        [("canary", "1", "0", "0"), ("wave-1", "2", "1", "1")]
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "1 of 3 databases succeeded" in summary and "- failed: not-gitlab" in summary
    assert "| good | canary | migrate milestone-1 | not started | verified |" in summary


def _k8s_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_the_k8s_jobs_are_valid_indexed_jobs_one_per_wave_retrying_only_resumable_codes(tmp_path):
    (tmp_path / "fleet.yml").write_text(INVENTORY)
    out = tmp_path / "jobs.yml"
    result = run("fleet", "k8s-job", "--inventory", str(tmp_path / "fleet.yml"), "milestone-1", "--image",
                 "registry.example.com/toolkit:0.1.0", "--password-secret", "gitlab-postgresql-password:"
                 "postgresql-password", "--out", str(out), "--", "--reconnect", "3")
    assert result.exit_code == 0, result.output
    checked = _k8s_check(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job", "Job", "Job"]
    assert yaml.safe_load(docs[0]["data"]["fleet.yml"]) == yaml.safe_load(INVENTORY)
    canary, wave1, wave2 = (d["spec"] for d in docs[1:])
    assert [(s["completions"], s["parallelism"], s["maxFailedIndexes"]) for s in (canary, wave1, wave2)] == \
        [(1, 1, 0), (3, 2, 3), (1, 1, 0)]
    assert canary["completionMode"] == "Indexed" and canary["backoffLimitPerIndex"] == 2
    rules = canary["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailIndex", "onExitCodes": {"containerName": "toolkit", "operator": "NotIn",
                                                                "values": [0, 4, 6, 7, 75]}}
    assert rules[1]["action"] == "Count" and rules[1]["onExitCodes"]["values"] == [4, 6, 7, 75]
    pod = wave1["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["command"] == ["toolkit", "fleet", "job", "--inventory", "/etc/toolkit-fleet/fleet.yml",
                                    "--wave", "wave-1", "--out", "/tmp/fleet-artifacts", "milestone-1", "--",
                                    "--reconnect", "3"]
    assert {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {
        "name": "gitlab-postgresql-password", "key": "postgresql-password"}}} in container["env"]
    # the validation is not a formality: a misspelt field (onExitCode) is refused
    rules[0]["onExitCode"] = rules[0].pop("onExitCodes")
    out.write_text(yaml.safe_dump_all(docs))
    assert _k8s_check(out).returncode != 0


def test_a_pod_finds_its_database_by_the_index_kubernetes_gives_it(tmp_path, make_database):
    """JOB_COMPLETION_INDEX, counted within the wave, picks the database at that position."""
    db = make_database("realistic:small")
    (tmp_path / "fleet.yml").write_text(
        "waves: [canary, w1]\ndatabases:\n  - {name: c, url_env: NOPE, wave: canary}\n"
        "  - {name: first, url_env: NOPE, wave: w1}\n  - {name: second, url_env: DB_URL, wave: w1}\n")
    result = run("fleet", "job", "--inventory", str(tmp_path / "fleet.yml"), "--wave", "w1", "--out",
                 str(tmp_path / "a"), "milestone-1", env={"JOB_COMPLETION_INDEX": "1", "DB_URL": db.url_text})
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "second" / "job.json").read_text())["state_after"] == "verified"
    past = run("fleet", "job", "--inventory", str(tmp_path / "fleet.yml"), "--wave", "w1", "--index", "2",
               "milestone-1")
    assert past.exit_code == 2 and "--index 2 is past the 2 databases of wave w1" in past.stderr
