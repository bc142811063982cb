"""The HTTP side of ``toolkit mlflow serve``: the API over the database (:class:`Api`),
one short transaction per request (READ ONLY for reads; read-write for the writes
``--allow-writes`` takes, :mod:`toolkit.mlflow_api.writing`), and the server that carries it.

The server is waitress (``waitress`` on PyPI), a pure-Python WSGI server, one dependency
and no compiler; the application is a thin WSGI layer over :class:`Api`
(:mod:`toolkit.mlflow_api.wsgi`). Chosen because it holds up when anyone can reach it:
its one I/O loop reads every request whole (headers and body) before a worker thread
sees it, so a slow or stalled client holds a socket and a buffer, never a thread; and its
limits are built in: ``max_request_body_size`` (a larger body is answered 413 as soon as
its ``Content-Length`` is read, a chunked one when it passes the limit; a body above
512 KiB waits in a temporary file, not in memory), ``max_request_header_size`` (431),
``channel_timeout`` (an idle connection is closed), ``connection_limit`` (beyond it new
connections wait in the listen backlog) and a fixed pool of worker threads. A malformed
request line, ``Content-Length`` (``-1``, not a number) or chunk is 400 before the
application is called. :class:`Limits` adds one limit waitress lacks: a request must
arrive whole within ``request_timeout_s`` of its first byte, so a client trickling a
byte a second cannot keep a connection forever.

A request never holds what a milestone needs for long: its transaction is READ ONLY and
REPEATABLE READ (one snapshot per answer), waits at most ``lock_timeout_ms`` for a lock
and runs at most ``statement_timeout_ms``; a lock it cannot have in time answers 503
``TEMPORARILY_UNAVAILABLE``, which MLflow clients retry. A request that meets the stage
changing under it (milestone 4 dropping ``ml_experiments`` between reading the catalog
and the table) is read again from the new stage. A write is one READ COMMITTED
transaction that locks the tables it writes before reading the stage, with the same
timeouts and the same 503s (and ``Retry-After``), run again whole when the stage changes
under it (:mod:`toolkit.mlflow_api.writing`).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from toolkit.db import TIMEOUTS_OPTION, Target, create_engine
from toolkit.errors import redact
from toolkit.mlflow_api import artifacts
from toolkit.mlflow_api.auth import Authenticator, User, needs_for
from toolkit.mlflow_api.errors import BUSY, STAGE_CHANGED, UNAVAILABLE
from toolkit.mlflow_api.projects import resolve_project
from toolkit.mlflow_api.registry import Registry
from toolkit.mlflow_api.tracking_writes import WRITES as TRACKING_WRITES
from toolkit.mlflow_api.views import MAX_PAGE, ApiError, View
from toolkit.mlflow_api.writing import WriteFunction, Writer
from toolkit.mlflow_api.wsgi import USER_KEY, MlflowApp, StreamCut
from toolkit.output import out


def _contributed_writes() -> dict[str, WriteFunction]:
    """Write endpoints other modules contribute beside the tracking ones: the model
    registry's (``toolkit.mlflow_api.registry_writes.WRITES``), when that module exists."""
    if importlib.util.find_spec("toolkit.mlflow_api.registry_writes") is None:
        return {}
    from toolkit.mlflow_api.registry_writes import WRITES

    return dict(WRITES)


class Api:
    """The endpoints: reads, each a function of (view, params), in a READ ONLY transaction;
    writes (``writes``, served with ``allow_writes``), each a function of (connection,
    :class:`~toolkit.mlflow_api.stages.WriteContext`, params), in a read-write transaction
    of their own (:class:`~toolkit.mlflow_api.writing.Writer`)."""

    def __init__(self, engine: Engine, *, lock_timeout_ms: int, statement_timeout_ms: int,
                 page_limit: int = MAX_PAGE, secrets: tuple[str, ...] = (),
                 auth: Authenticator | None = None, lenient: bool = False,
                 packages_dir: Path | None = None, allow_writes: bool = False):
        self.engine = engine
        self.allow_writes = allow_writes
        self.auth = auth  # None: no token source, every request is let in (loopback only)
        self.lenient = lenient  # accept the client's list order_by (GitLab refuses it)
        self.packages_dir = packages_dir  # GitLab's package store (local storage), or a copy
        self.timeouts = (lock_timeout_ms, statement_timeout_ms)
        self.page_limit = page_limit
        self.secrets = secrets
        limit = page_limit
        self.reads: dict[str, Callable[[View, dict[str, Any]], dict[str, Any]]] = {
            "experiments/get": lambda v, p: v.get_experiment(p),
            "experiments/get-by-name": lambda v, p: v.get_experiment_by_name(p),
            "experiments/search": lambda v, p: v.search_experiments(p, limit),
            "runs/get": lambda v, p: v.get_run(p),
            "runs/search": lambda v, p: v.search_runs(p, limit),
            "metrics/get-history": lambda v, p: v.metric_history(p, limit),
            "registered-models/get": lambda v, p: Registry(v).registered_model(p),
            "registered-models/get-latest-versions": lambda v, p: Registry(v).latest_versions(p),
            "registered-models/search": lambda v, p: Registry(v).search(p, limit),
            "registered-models/alias": lambda v, p: Registry(v).version_by_alias(p),
            "model-versions/get": lambda v, p: Registry(v).model_version(p),
            "model-versions/get-download-uri": lambda v, p: Registry(v).download_uri(p),
        }
        # endpoint -> function(conn, ctx, params); the registry's writes join from their module
        self.writes: dict[str, WriteFunction] = {**TRACKING_WRITES, **_contributed_writes()}
        self.writer = Writer(engine, timeouts=self.timeouts, secrets=secrets)

    @classmethod
    def connect(cls, target: Target | str, *, lock_timeout_ms: int = 1000, statement_timeout_ms: int = 10_000,
                page_limit: int = MAX_PAGE, auth: Authenticator | None = None, lenient: bool = False,
                packages_dir: Path | None = None, threads: int = 8, allow_writes: bool = False) -> Api:
        """An API over its own small pool, its sessions named ``toolkit mlflow serve``: a
        connection for each of the server's ``threads`` (at most that many are ever busy)."""
        engine = create_engine(target, read_timeout=statement_timeout_ms, pool_size=threads,
                               max_overflow=0, pool_timeout=10,
                               connect_args={"application_name": "toolkit mlflow serve"})
        return cls(engine, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=statement_timeout_ms,
                   page_limit=page_limit, secrets=target.secrets if isinstance(target, Target) else (),
                   auth=auth, lenient=lenient, packages_dir=packages_dir, allow_writes=allow_writes)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True,
                                          **{TIMEOUTS_OPTION: self.timeouts})
            with conn.begin() as transaction:
                try:
                    yield conn
                finally:
                    transaction.rollback()

    def authenticate(self, method: str, headers: Any, params: dict[str, Any], project: str,
                     endpoint: str) -> User | None:
        """GitLab's token, scope and project checks before ``endpoint`` runs, in a short READ
        ONLY transaction of their own; the user (id and username), or None without a token
        source. Raises GitLab's 401/403/404 as an :class:`ApiError`."""
        if self.auth is None:
            return None
        auth = self.auth
        return self._retrying(lambda conn: auth.authenticate(
            conn, method, headers, params, _project_id(conn, project), needs_for(endpoint, method)))

    def write(self, endpoint: str, project: str, base_url: str, params: dict[str, Any],
              user_id: int | None) -> dict[str, Any]:
        """``endpoint``'s write, one transaction (:class:`~toolkit.mlflow_api.writing.Writer`)."""
        return self.writer.write(self.writes[endpoint], endpoint, project, base_url, params, user_id)

    def answer(self, endpoint: str, project: str, base_url: str, params: dict[str, Any]) -> dict[str, Any]:
        read = self.reads[endpoint]
        return self._retrying(lambda conn: read(View(conn, project, base_url, lenient=self.lenient), params))

    def artifact_list(self, project: str, base_url: str, params: dict[str, Any]) -> dict[str, Any]:
        return self._retrying(lambda conn: artifacts.list_artifacts(View(conn, project, base_url), params))

    def artifact_file(self, project: str, base_url: str, version: str, file_path: str) -> artifacts.Download:
        """The file row in one transaction; the disk is read after it has ended."""
        stored = self._retrying(lambda conn: artifacts.find_file(View(conn, project, base_url), version,
                                                                 file_path))
        return artifacts.open_file(stored, self.packages_dir)

    def list_pages(self, project: str, base_url: str) -> Iterator[list[dict[str, Any]]]:
        """experiments/list, a page per transaction (a project's every experiment is not
        held in memory, nor one transaction open while a slow client reads)."""
        token: str | None = None
        while True:
            def page(conn: Connection, token=token) -> tuple[list[dict[str, Any]], str | None]:
                return View(conn, project, base_url).experiments_list_page(token, self.page_limit)
            experiments, token = self._retrying(page)
            yield experiments
            if token is None:
                return

    def _retrying(self, work: Callable[[Connection], Any]) -> Any:
        for attempt in range(3):
            try:
                with self.transaction() as conn:
                    return work(conn)
            except DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None) or ""
                if code in STAGE_CHANGED and attempt < 2:
                    continue
                first = redact(str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else "",
                               self.secrets)
                # a value the database cannot take (a forged page_token): class 22, or what
                # psycopg refuses before sending (a NUL in a string)
                if code.startswith("22") or (not code and isinstance(exc.orig, psycopg.DataError)):
                    raise ApiError(400, "INVALID_PARAMETER_VALUE",
                                   f"A parameter is not valid: {first}") from exc
                if (code in BUSY or code in STAGE_CHANGED or code.startswith(UNAVAILABLE)
                        or exc.connection_invalidated
                        or (not code and isinstance(exc.orig, psycopg.OperationalError))):
                    # the server restarting, full or shutting down, or a milestone's schema
                    # change under way (milestone 4 drops its tables one after the other):
                    # MLflow clients retry a 503, as they do a write's
                    why = BUSY.get(code) or (
                        "the schema kept changing under it (a migration step may be changing it)"
                        if code in STAGE_CHANGED else
                        "the database is unreachable or refused the connection")
                    raise ApiError(503, "TEMPORARILY_UNAVAILABLE",
                                   f"The database did not answer this read: {why} ({first}); "
                                   "try again") from exc
                raise ApiError(500, "INTERNAL_ERROR", f"The read failed: {first}") from exc
            except PoolTimeout as exc:
                raise ApiError(503, "TEMPORARILY_UNAVAILABLE",
                               "Every database connection of the server is busy; try again") from exc
        raise AssertionError("unreachable")


def _project_id(conn: Connection, segment: str) -> int | None:
    """The project the URL names (id or URL-encoded full path), None when there is none:
    GitLab authenticates first and answers 404 Project Not Found after."""
    try:
        return resolve_project(conn, segment)
    except ApiError:
        return None


MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one client can make the server hold, and for how long (``toolkit mlflow serve
    --help`` names the options). MLflow's largest read request is a few KiB; its
    ``log-batch`` at MLflow's own limits (1000 metrics; 100 params of up to 6000 characters;
    100 tags of up to 8000) is under 2 MiB, so the 16 MiB body limit refuses nothing a
    client sends."""

    max_body_bytes: int = 16 * MIB
    max_header_bytes: int = 64 * 1024
    idle_timeout_s: int = 60  # a connection with no request and no byte for this long is closed
    request_timeout_s: int = 60  # a request must arrive whole within this of its first byte
    max_connections: int = 500
    threads: int = 8


class _TimedParser(HTTPRequestParser):
    """waitress's request parser, knowing when the request's first byte came."""

    def __init__(self, adj: Adjustments):
        super().__init__(adj)
        self.started = time.monotonic()


class _ErrorTask(ErrorTask):
    """waitress's answer to a request it refused before the application (a malformed
    request line or Content-Length, 413, 431): the status and its reason in plain text,
    as GitLab's Rack layer answers a malformed request, and an access log line."""

    def execute(self) -> None:
        started = getattr(self.request, "started", time.monotonic())
        error = self.request.error
        self.status = f"{error.code} {error.reason}"
        body = error.reason.encode()
        self.response_headers.append(("Content-Type", "text/plain"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        server: MlflowServer = self.channel.server
        request = self.request
        server.app.log({"REQUEST_METHOD": getattr(request, "command", None) or "-",
                        "PATH_INFO": getattr(request, "path", "") or "",
                        "QUERY_STRING": getattr(request, "query", "") or "",
                        "REMOTE_ADDR": self.channel.addr[0] if self.channel.addr else "-",
                        USER_KEY: "-"}, error.code, started)


class _Channel(HTTPChannel):
    parser_class = _TimedParser
    error_task_class = _ErrorTask


class _OneLine(logging.Handler):
    """waitress's own log (requests waiting for a thread, the connection limit reached) as
    one line on stderr through the toolkit's output; never a traceback. A client gone
    mid-answer, and a stream the application already reported cut, say nothing; requests
    waiting for a thread are said when ten or more wait (a few is a busy moment)."""

    QUEUE_SAID_FROM = 10

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            return
        if record.exc_info and isinstance(record.exc_info[1], StreamCut | ConnectionError):
            return
        if (record.name == "waitress.queue" and isinstance(record.args, tuple) and record.args
                and isinstance(record.args[0], int) and record.args[0] < self.QUEUE_SAID_FROM):
            return
        problem = f": {type(record.exc_info[1]).__name__}" if record.exc_info and record.exc_info[1] else ""
        out.note(f"mlflow serve: {record.getMessage().splitlines()[0][:300]}{problem}")


_waitress_log = logging.getLogger("waitress")
_waitress_log.addHandler(_OneLine())
_waitress_log.propagate = False  # and not Python's last-resort handler, which prints tracebacks


class MlflowServer(TcpWSGIServer):
    """``toolkit mlflow serve``'s server: waitress with :class:`Limits`, serving
    :class:`MlflowApp` over ``api``. ``external_url`` starts every URI in answers
    (``artifact_uri``); it defaults to http://<the bound address>.

    ``serve_forever()`` runs it until ``shutdown()`` (from another thread) or
    KeyboardInterrupt; ``server_close()`` releases the socket."""

    channel_class = _Channel

    def __init__(self, address: tuple[str, int], api: Api, *, limits: Limits = Limits(),
                 external_url: str | None = None, access_log: bool = True):
        host, port = address
        adj = Adjustments(
            listen=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            threads=limits.threads, connection_limit=limits.max_connections,
            channel_timeout=limits.idle_timeout_s,
            # how often idle and slow connections are looked for
            cleanup_interval=max(1, min(30, min(limits.idle_timeout_s, limits.request_timeout_s) // 2)),
            max_request_body_size=limits.max_body_bytes, max_request_header_size=limits.max_header_bytes,
            ident="toolkit-mlflow", expose_tracebacks=False, log_socket_errors=False,
            # poll(), not select(): select() cannot watch a socket numbered above 1023
            asyncore_use_poll=True)
        self.limits = limits
        self.api = api
        self.app = MlflowApp(api, "http://placeholder", access_log=access_log)
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(limits.threads)
        try:
            super().__init__(self.app, map={}, dispatcher=dispatcher, adj=adj, sockinfo=adj.listen[0])
        except BaseException:
            dispatcher.shutdown(timeout=1)
            raise
        self.app.external_url = (external_url or f"http://{self.address_text}").rstrip("/")
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def external_url(self) -> str:
        return self.app.external_url

    @property
    def server_address(self) -> tuple[str, int]:
        return str(self.effective_host), int(self.effective_port)

    @property
    def address_text(self) -> str:
        host, port = self.server_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def maintenance(self, now: float) -> None:
        """waitress closes connections idle for ``channel_timeout``; this also closes those
        whose request has not arrived whole within ``request_timeout_s``."""
        super().maintenance(now)
        cutoff = time.monotonic() - self.limits.request_timeout_s
        for channel in list(self.active_channels.values()):
            request = channel.request
            if request is not None and getattr(request, "started", cutoff) < cutoff:
                channel.will_close = True

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                wasyncore.loop(timeout=self.adj.asyncore_loop_timeout, map=self._map, use_poll=True, count=1)
        finally:
            for channel in list(self._map.values()):
                if channel is not self and channel is not self.trigger:
                    channel.close()
            self.task_dispatcher.shutdown(timeout=5)
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` running in another thread, and wait for it."""
        self._stop.set()
        self.pull_trigger()
        self._stopped.wait(timeout=10)

    def server_close(self) -> None:
        self.close()


def serve_in_thread(server: MlflowServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="mlflow-serve", daemon=True)
    thread.start()
    return thread
