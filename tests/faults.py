"""Faults injected from outside a running toolkit: a server of the test module's own that
can be restarted (fast or immediate), and the toolkit's batch session terminated.

The toolkit runs as a real process (``python -m toolkit``) with small batches and a pause
between them; the test polls ``toolkit.checkpoints`` for the batches the run has committed
and acts once a chosen number of them have. Only the server started here is ever restarted
(the session's shared ``pg_server`` is used by every other test).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from helpers import Queries
from sqlalchemy.engine import Engine

from toolkit.db import create_engine
from toolkit.sandbox.server import SandboxServer, ServerStatus, _bin

# The test's own sessions are told apart from the toolkit's ('toolkit run N token T', and the lock
# session's 'toolkit migrate ...' / 'toolkit rollback ...') by their application_name.
TEST_APPLICATION = "tk-test-observer"

# Small and quick to restart: little memory, few connections, no fsync (the machine does
# not crash, only the server: what it wrote is in the OS's cache). synchronous_commit stays
# on: with it off an immediate shutdown loses the last ~200 ms of commits (the WAL writer's
# delay), which is the setting's documented trade-off, not the toolkit losing batches.
SETTINGS = {
    "fsync": "off", "synchronous_commit": "on", "full_page_writes": "off",
    "shared_buffers": "32MB", "max_connections": "40", "max_wal_size": "256MB",
    "checkpoint_timeout": "30min", "maintenance_work_mem": "32MB", "work_mem": "4MB",
}


def observer_engine(url: str) -> Engine:
    return create_engine(url, connect_args={"application_name": TEST_APPLICATION})


@dataclass
class ServerDb(Queries):
    """One database on the module's server, shaped like conftest's ``Database``."""

    name: str
    url_text: str
    engine: Engine = field(repr=False)


class FaultServer:
    """A PostgreSQL server in a temporary directory that tests may restart at will."""

    def __init__(self, settings: dict[str, str] | None = None):
        self.data_dir = Path(tempfile.mkdtemp(prefix="tk-fault-pg-"))
        self.server = SandboxServer(self.data_dir, {**SETTINGS, **(settings or {})})
        self.status: ServerStatus | None = None
        self.databases: dict[str, ServerDb] = {}

    @classmethod
    @contextlib.contextmanager
    def started(cls, settings: dict[str, str] | None = None) -> Iterator[FaultServer]:
        made = cls(settings)
        try:
            made.status = made.server.start()
            yield made
        finally:
            for db in made.databases.values():
                db.dispose()
            made.server.destroy()
            shutil.rmtree(made.data_dir, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------
    def url(self, database: str) -> str:
        assert self.status is not None
        return self.status.url(database).replace("postgresql+psycopg", "postgresql")

    def _admin(self, sql: str) -> None:
        engine = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT",
                               connect_args={"application_name": TEST_APPLICATION})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(sql))
        finally:
            engine.dispose()

    def database(self, name: str, template: str | None = None) -> ServerDb:
        """A new database ``name`` (empty, or a copy of ``template``, whose sessions end first)."""
        if template is not None and template in self.databases:
            self.databases[template].dispose()
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        # FILE_COPY, not the default WAL_LOG: a WAL_LOG copy keeps each sequence's log_cnt,
        # so its nextval() calls are not WAL-logged until that runs out, and a crash (an
        # immediate restart) sets the copy's sequences back: duplicate keys in toolkit.runs
        # and new ml_models (reported on pgsql-hackers, "CREATE DATABASE ... TEMPLATE with
        # WAL_LOG strategy can cause sequence values to rollback"). FILE_COPY checkpoints.
        self._admin(f'CREATE DATABASE "{name}"'
                    + (f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""))
        db = ServerDb(name, self.url(name), observer_engine(self.url(name)))
        self.databases[name] = db
        return db

    def drop(self, name: str) -> None:
        if db := self.databases.pop(name, None):
            db.dispose()
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- faults ------------------------------------------------------------------------
    def restart(self, mode: str) -> float:
        """``pg_ctl restart -m mode``, waiting until the server accepts connections again;
        returns how long the server was away (seconds)."""
        began = time.monotonic()
        self.server._run([str(_bin("pg_ctl")), "-D", str(self.server.pgdata), "-l", str(self.server.logfile),
                          "-w", "-t", "60", "-m", mode, "restart"])
        self.status = self.server.status()
        assert self.status.running, f"the server did not come back after a {mode} restart"
        return time.monotonic() - began

    def stop_for(self, seconds: float) -> None:
        """A restart that takes a while (a fast shutdown, ``seconds`` down, a start), as a
        production server's does: its checkpoint at shutdown, its recovery at start."""
        self.server.stop()
        time.sleep(seconds)
        self.status = self.server.start()

    def terminate_batch_session(self, database: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """pg_terminate_backend of the toolkit's session that runs batches: application_name
        'toolkit run N token T' (not the lock session, 'toolkit migrate ...'/'toolkit rollback ...'), caught
        inside a transaction (a batch in flight) when possible, else the one active last.
        Returns its pid and the state it was caught in."""
        engine = create_engine(self.url(database), isolation_level="AUTOCOMMIT",
                               connect_args={"application_name": TEST_APPLICATION})
        try:
            with engine.connect() as conn:
                started = time.monotonic()
                while True:
                    waited = time.monotonic() - started
                    # first a session holding a transaction id (a batch that has written: the
                    # fault is certain to cost it its commit), then any busy one but the
                    # pool's ping (a ping that fails only makes the pool connect again), then
                    # an idle one; found and terminated in one statement, so the session has
                    # no time to commit in between
                    found = conn.execute(sa.text("""
                        SELECT pid, state, pg_terminate_backend(pid) AS ended FROM (
                            SELECT pid, state FROM pg_stat_activity
                            WHERE datname = :d
                              AND application_name ~ '^toolkit( run [0-9]+)? token [0-9]+$'
                              AND CASE WHEN :stage = 0 THEN backend_xid IS NOT NULL
                                       WHEN :stage = 1 THEN state <> 'idle' AND query <> 'SELECT 1'
                                       ELSE true END
                            ORDER BY state <> 'idle' DESC, backend_xid IS NOT NULL DESC,
                                     state_change DESC NULLS LAST
                            LIMIT 1) AS target"""),
                        {"d": database, "stage": 0 if waited < timeout_s / 2 else
                         1 if waited < timeout_s else 2}).one_or_none()
                    if found is not None and found.ended:
                        return found.pid, found.state
                    if waited >= timeout_s:
                        raise AssertionError(f"no toolkit session to terminate in {database}")
                    time.sleep(0.002)
        finally:
            engine.dispose()



# -- the toolkit as a process ------------------------------------------------------------
@dataclass
class Running:
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def wait(self, timeout_s: float = 120) -> tuple[int, str, str]:
        code = self.process.wait(timeout=timeout_s)
        return code, self.stdout.read_text(), self.stderr.read_text()


def end_left(started: list[Running]) -> None:
    """At a test's end, the runs it started and left going (a paused, held or waiting run
    would never end by itself) are killed, so a failing test leaves none behind."""
    while started:
        run = started.pop()
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def start_toolkit(db: ServerDb, args: tuple[str, ...], out_dir: Path, tag: str) -> Running:
    stdout, stderr = out_dir / f"{tag}.out", out_dir / f"{tag}.err"
    env = {**os.environ, "TOOLKIT_DATABASE_URL": db.url_text}
    for name in [n for n in env if n.startswith("TOOLKIT_FAULT_") or n == "TOOLKIT_DEBUG"]:
        del env[name]
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "toolkit", *args], env=env,
                                   stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return Running(process, stdout, stderr)


def newest_run_id(db: ServerDb) -> int:
    if db.scalar("SELECT to_regclass('toolkit.runs') IS NULL"):
        return 0
    return db.scalar("SELECT coalesce(max(id), 0) FROM toolkit.runs") or 0


def committed_batches(db: ServerDb, after_run: int) -> tuple[int | None, int]:
    """The newest run after ``after_run`` and how many batches it has committed."""
    if db.scalar("SELECT to_regclass('toolkit.checkpoints') IS NULL"):
        return None, 0  # the toolkit has not created its schema yet
    row = db.rows("""
        SELECT r.id, (SELECT coalesce(sum(c.batches_done), 0) FROM toolkit.checkpoints c
                      WHERE c.run_id = r.id)
        FROM toolkit.runs r WHERE r.id > :after ORDER BY r.id DESC LIMIT 1""", after=after_run)
    return (row[0][0], int(row[0][1])) if row else (None, 0)


def wait_for_batches(db: ServerDb, running: Running, after_run: int, batches: int,
                     timeout_s: float = 60) -> int:
    """Poll until the run has committed ``batches`` batches; returns its run id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run_id, done = committed_batches(db, after_run)
        if run_id is not None and done >= batches:
            return run_id
        if running.process.poll() is not None:
            raise AssertionError(f"the run ended (exit {running.process.returncode}) after {done} "
                                 f"batches, before the fault at batch {batches}: "
                                 f"{running.stderr.read_text()[-2000:]}")
        time.sleep(0.005)
    raise AssertionError(f"the run did not reach batch {batches} in {timeout_s}s")


def checkpoint_rows(db: ServerDb, run_id: int) -> tuple[dict[str, int], int]:
    """Rows each step of run ``run_id`` committed and its batches, as its checkpoints count them."""
    found = db.rows("SELECT step, rows_done, batches_done FROM toolkit.checkpoints WHERE run_id = :r",
                    r=run_id)
    return {r[0]: int(r[1]) for r in found if r[1]}, sum(int(r[2]) for r in found)


# Rows a milestone creates take their ids from sequences. After a crash (an immediate
# restart) PostgreSQL resumes each sequence after the values it had logged ahead, up to 32
# more than it handed out (the nextval() documentation: values may be skipped after a
# crash), so models created after the restart have other ids than the twin's. These are
# the parts of an end state that hold such ids; ``id_free`` compares them by natural keys.
SEQUENCE_ID_PARTS = {"tables.ml_models", "tables.ml_model_metadata", "tables.ml_candidates",
                     "tables.ml_experiments", "ledgers.m3_created_models", "ledgers.m3_copied_metadata"}
_MODEL = "jsonb_build_array(m.project_id, m.name)"
_ID_FREE = {
    "ml_models": "SELECT to_jsonb(m) - 'id' FROM ml_models m",
    "ml_model_metadata": f"""SELECT to_jsonb(d) - 'id' - 'model_id' || jsonb_build_object('model', {_MODEL})
        FROM ml_model_metadata d LEFT JOIN ml_models m ON m.id = d.model_id""",
    "ml_candidates": f"""SELECT to_jsonb(c) - 'model_id' || jsonb_build_object('model', {_MODEL})
        FROM ml_candidates c LEFT JOIN ml_models m ON m.id = c.model_id""",
    "ml_experiments": f"""SELECT to_jsonb(e) - 'model_id' || jsonb_build_object('model', {_MODEL})
        FROM ml_experiments e LEFT JOIN ml_models m ON m.id = e.model_id""",
    "toolkit.m3_created_models": f"""SELECT to_jsonb(c) - 'model_id' - 'run_id' - 'created_at'
        || jsonb_build_object('model', {_MODEL})
        FROM toolkit.m3_created_models c LEFT JOIN ml_models m ON m.id = c.model_id""",
    "toolkit.m3_copied_metadata": f"""SELECT to_jsonb(c) - 'model_metadata_id' - 'model_id' - 'run_id'
        || jsonb_build_object('model', {_MODEL}, 'metadata', d.name)
        FROM toolkit.m3_copied_metadata c LEFT JOIN ml_models m ON m.id = c.model_id
        LEFT JOIN ml_model_metadata d ON d.id = c.model_metadata_id""",
}


def id_free(db: ServerDb) -> dict[str, list[str]]:
    """The tables that hold sequence-made ids, each row with those ids replaced by natural
    keys (a model by project and name, its metadata by model and name), sorted."""
    found = {}
    for table, sql in _ID_FREE.items():
        try:
            found[table] = sorted(r[0] for r in db.rows(f"SELECT CAST(x AS text) FROM ({sql}) AS s(x)"))
        except sa.exc.ProgrammingError:  # not there at this stage (no model_id before milestone 2)
            found[table] = None
    return found
