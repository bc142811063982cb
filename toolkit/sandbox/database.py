"""The sandbox's GitLab database: (re)create it and seed it.

Seeding always replaces the sandbox database as a whole. It never runs against a URL an
operator typed: only the sandbox server's own database can be reset this way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa

from toolkit.db import create_engine
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
