"""gitlab-ci-local for the fleet's tests: a project holding the generated child pipeline,
and gitlab-ci-local run on it with its shell executor.

gitlab-ci-local honours stages, artifacts and ``allow_failure`` but not ``resource_group``
nor ``retry`` (those two are checked in the YAML by tests/test_fleet_pipeline.py). It is
an npm package: `.ci/run` installs the pinned release (GITLAB_CI_LOCAL_VERSION below, the
newest that runs on Node 20: 4.74 and later need Node 22) into .ci/node; without it, or
without git and rsync (which it calls), the tests that need it are skipped saying so.
"""

from __future__ import annotations

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


def gitlab_ci_local() -> str:
    found = os.environ.get(ENV) or (str(BUNDLED) if BUNDLED.exists() else None)
    if not found:
        pytest.skip(f"gitlab-ci-local is not installed: {HOW}")
    for tool in ("git", "rsync", "node"):
        if shutil.which(tool) is None:
            pytest.skip(f"gitlab-ci-local needs {tool}, which is not installed: {HOW}")
    return found


def project(path: Path, inventory: str, variables: dict[str, str], *pipeline_args: str) -> Path:
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


def words(binary: str, project: Path, *args: str) -> list[str]:
    return [binary, "--file", "fleet-pipeline.yml", "--no-color", "--home", str(project / ".home"),
            "--concurrency", "4", *args]


def run(binary: str, project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(words(binary, project, *args), cwd=project, capture_output=True, text=True,
                          timeout=240)


