"""``fleet pipeline``: the GitLab CI child pipeline that runs a milestone on every database.

GitLab has the pieces but not the whole: ``parallel:matrix`` stops at 200 jobs and has no
cap on how many run at once (gitlab-org/gitlab#438369, #552219), so the generator writes
one job per database and bounds each wave by splitting it into stages of at most
``max_parallel`` jobs (a stage starts when the one before it is done). ``resource_group``
per database keeps two pipelines off one database (the toolkit's runner lock refuses the
second anyway; this makes it wait instead of fail). ``retry`` is limited to the exit codes
after which the same command resumes; a wave whose ``on_error`` is ``stop`` (the canary's)
has jobs that may not fail, so GitLab skips every later stage when one does; a wave that
continues marks its jobs ``allow_failure`` and the report names them.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from toolkit.fleet import record
from toolkit.fleet.inventory import Database, Fleet, Wave

ARTIFACTS_DIR = "fleet-artifacts"
REPORT_DIR = "fleet-report"
REPORT_STAGE = "fleet report"
DEFAULT_RETRIES = 2


def stages(fleet: Fleet) -> list[tuple[str, Wave, list[Database]]]:
    """Each wave's stages in run order: the wave cut into groups of ``max_parallel``."""
    out: list[tuple[str, Wave, list[Database]]] = []
    for wave in fleet.waves:
        members = fleet.in_wave(wave.name)
        groups = [members[i:i + wave.max_parallel] for i in range(0, len(members), wave.max_parallel)]
        for n, group in enumerate(groups, 1):
            name = wave.name if len(groups) == 1 else f"{wave.name} {n}/{len(groups)}"
            out.append((name, wave, group))
    return out


def job_name(action: str, milestone: str, database: str) -> str:
    return f"{'rollback ' if action == 'rollback' else ''}{milestone} {database}"


def generate(fleet: Fleet, action: str, milestone: str, *, toolkit: str = "toolkit",
             inventory_path: str = "fleet.yml", extra: tuple[str, ...] = (),
             retries: int = DEFAULT_RETRIES, image: str | None = None,
             tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """The child pipeline as a mapping (``render`` writes it as YAML)."""
    planned = stages(fleet)
    doc: dict[str, Any] = {"stages": [name for name, _, _ in planned] + [REPORT_STAGE]}
    if image or tags:
        doc["default"] = {**({"image": image} if image else {}), **({"tags": list(tags)} if tags else {})}
    run_args = " ".join(shlex.quote(w) for w in extra)
    rollback = ["rollback"] if action == "rollback" else []
    for stage, wave, group in planned:
        for database in group:
            words = [*shlex.split(toolkit), "fleet", "job", "--inventory", inventory_path,
                     "--database", database.name, "--out", ARTIFACTS_DIR, *rollback, milestone]
            script = " ".join(shlex.quote(w) for w in words) + (f" -- {run_args}" if run_args else "")
            job: dict[str, Any] = {
                "stage": stage,
                "resource_group": f"toolkit-fleet-{database.name}",
                "variables": {"FLEET_DATABASE": database.name, "FLEET_WAVE": wave.name},
                "script": [script],
                "artifacts": {
                    "when": "always",
                    "paths": [f"{ARTIFACTS_DIR}/{database.name}/"],
                    "reports": {"junit": f"{ARTIFACTS_DIR}/{database.name}/{record.JUNIT_FILE}"},
                },
            }
            if retries:
                job["retry"] = {"max": retries, "exit_codes": list(record.RESUMABLE)}
            if wave.on_error == "continue":
                job["allow_failure"] = True
            doc[job_name(action, milestone, database.name)] = job
    report = [*shlex.split(toolkit), "fleet", "report", ARTIFACTS_DIR, "--inventory", inventory_path,
              "--out", REPORT_DIR]
    doc["fleet report"] = {
        "stage": REPORT_STAGE,
        "when": "always",  # also after a canary stopped the waves: the report names what did not run
        "script": [" ".join(shlex.quote(w) for w in report)],
        "artifacts": {"when": "always", "paths": [f"{REPORT_DIR}/"]},
    }
    return doc


def render(doc: dict[str, Any], header: str) -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(doc, sort_keys=False, width=1000)
