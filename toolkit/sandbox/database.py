"""The sandbox's GitLab database: (re)create it and seed it.

Seeding always replaces the sandbox database as a whole. It never runs against a URL an
operator typed: only the sandbox server's own database can be reset this way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from toolkit.db import create_engine
from toolkit.errors import SandboxReplaced
from toolkit.sandbox.generator import SeedReport, seed_database
from toolkit.sandbox.package_files import write_package_files
from toolkit.sandbox.scales import SCALES
from toolkit.sandbox.server import SANDBOX_DATABASE, ServerStatus


def recreate_database(status: ServerStatus, name: str = SANDBOX_DATABASE) -> None:
    admin = create_engine(status.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()


def ensure_database(status: ServerStatus, name: str = SANDBOX_DATABASE) -> bool:
    """Create the sandbox database if missing; True when it was created."""
    admin = create_engine(status.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
            if not exists:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            return not exists
    finally:
        admin.dispose()


def seed_sandbox(status: ServerStatus, scale: str, profile: str, seed: int,
                 on_phase: Callable[[str], None] | None = None,
                 metrics_per_candidate: int | None = None) -> SeedReport:
    sized = SCALES[scale]
    if metrics_per_candidate is not None:
        sized = replace(sized, metrics=sized.candidates * metrics_per_candidate)
    recreate_database(status)
    engine = create_engine(status.url())
    try:
        with engine.connect() as conn:
            return seed_database(conn, sized, profile, seed, on_phase=on_phase)
    finally:
        engine.dispose()


def write_sandbox_package_files(status: ServerStatus, packages_dir: Path) -> int:
    """The sandbox's package files under ``packages_dir`` (see :mod:`package_files`)."""
    engine = create_engine(status.url())
    try:
        with engine.connect() as conn:
            return write_package_files(conn, packages_dir)
    finally:
        engine.dispose()


_OID = "SELECT oid FROM pg_database WHERE datname = %s"


class SameDatabase:
    """Tells when the sandbox database was replaced (dropped and created again, by a run
    that did not hold the sandbox, or by hand) under a run that is using it.

    A replaced database has a new oid. The engine's pool reconnects silently to the new
    one (``pool_pre_ping``), so every new connection is checked; :meth:`check` asks the
    server afresh, for the end of a run and for a failure that may have been the cause.
    """

    def __init__(self, status: ServerStatus, engine: Engine, name: str = SANDBOX_DATABASE):
        self.status = status
        self.name = name
        self.oid = self._current()
        event.listen(engine, "connect", self._on_connect)

    def _current(self) -> int | None:
        admin = create_engine(self.status.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                return conn.exec_driver_sql(_OID, (self.name,)).scalar()
        finally:
            admin.dispose()

    def _on_connect(self, dbapi_connection, _record) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT oid FROM pg_database WHERE datname = current_database()")
            oid = cursor.fetchone()[0]
        dbapi_connection.rollback()
        if oid != self.oid:
            raise self._replaced(oid)

    def check(self) -> None:
        """Raise :class:`SandboxReplaced` when the database is no longer the one we began with."""
        if (oid := self._current()) != self.oid:
            raise self._replaced(oid)

    def _replaced(self, oid: int | None) -> SandboxReplaced:
        now = "is gone" if oid is None else f"is another one (oid {self.oid}, now {oid})"
        return SandboxReplaced(
            f"The sandbox database {self.name} was replaced while this run used it: it {now}, so "
            "what was checked after that was not the database this run began with",
            "run it again with nothing else using the sandbox (`toolkit sandbox seed` and "
            "`toolkit demo` refuse while a run holds it; a database dropped by hand or by an "
            "older toolkit is not seen)")
