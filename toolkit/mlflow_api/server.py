"""The HTTP side of ``toolkit mlflow serve``: GitLab's routes, MLflow's error documents,
one short READ ONLY transaction per request.

Python's own ``http.server`` (``ThreadingHTTPServer``) serves it: the API is a handful of
JSON endpoints, the operator installs nothing more, and each request's thread holds one
pooled connection for the length of one transaction.

A request never holds what a milestone needs for long: its transaction is READ ONLY and
REPEATABLE READ (one snapshot per answer), waits at most ``lock_timeout_ms`` for a lock
and runs at most ``statement_timeout_ms``; a lock it cannot have in time answers 503
``TEMPORARILY_UNAVAILABLE``, which MLflow clients retry. A request that meets the stage
changing under it (milestone 4 dropping ``ml_experiments`` between reading the catalog
and the table) is read again from the new stage.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from toolkit.db import TIMEOUTS_OPTION, Target, create_engine
from toolkit.errors import redact
from toolkit.mlflow_api.auth import Authenticator, needs_for
from toolkit.mlflow_api.views import MAX_PAGE, ApiError, View, _integer
from toolkit.output import out

TRACKING_PATH = "/api/v4/projects/{project}/ml/mlflow"
ROUTE = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)/ml/mlflow/api/2\.0/(?:preview/)?mlflow/"
                   r"(?P<endpoint>[a-z0-9/_-]+)$")
# What a catalog change under a request looks like: the stage moved on; read it again.
STAGE_CHANGED = {"42P01", "42703"}  # undefined table, undefined column
BUSY = {"55P03": "a lock it needed was held too long", "57014": "it ran longer than its statement_timeout"}


def _params(body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
    params: dict[str, Any] = {key: values if key in ("experiment_ids", "order_by") else values[0]
                              for key, values in query.items()}
    params.update(body)
    return params


class Api:
    """The endpoints, each a function of (view, params); reads only."""

    def __init__(self, engine: Engine, *, lock_timeout_ms: int, statement_timeout_ms: int,
                 page_limit: int = MAX_PAGE, secrets: tuple[str, ...] = (),
                 auth: Authenticator | None = None):
        self.engine = engine
        self.auth = auth  # None: no token source, every request is let in (loopback only)
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
            "registered-models/get": lambda v, p: v.registered_model(p),
        }

    @classmethod
    def connect(cls, target: Target | str, *, lock_timeout_ms: int = 1000, statement_timeout_ms: int = 10_000,
                page_limit: int = MAX_PAGE, auth: Authenticator | None = None) -> Api:
        """An API over its own small pool, its sessions named ``toolkit mlflow serve``."""
        engine = create_engine(target, read_timeout=statement_timeout_ms, pool_size=4, max_overflow=8,
                               pool_timeout=10, connect_args={"application_name": "toolkit mlflow serve"})
        return cls(engine, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=statement_timeout_ms,
                   page_limit=page_limit, secrets=target.secrets if isinstance(target, Target) else (),
                   auth=auth)

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
                     endpoint: str) -> str | None:
        """GitLab's token, scope and project checks before ``endpoint`` runs, in a short READ
        ONLY transaction of their own; the user's username, or None without a token source.
        Raises GitLab's 401/403/404 as an :class:`ApiError`."""
        if self.auth is None:
            return None
        auth = self.auth
        user = self._retrying(lambda conn: auth.authenticate(
            conn, method, headers, params, _integer(project), needs_for(endpoint, method)))
        return user.username

    def answer(self, endpoint: str, project: str, base_url: str, params: dict[str, Any]) -> dict[str, Any]:
        read = self.reads[endpoint]
        return self._retrying(lambda conn: read(View(conn, project, base_url), params))

    def list_pages(self, project: str, base_url: str) -> Iterator[list[dict[str, Any]]]:
        """experiments/list, a page per transaction (a project's every experiment is not
        held in memory, nor one transaction open while a slow client reads)."""
        token: str | None = None
        while True:
            def page(conn: Connection, token=token) -> tuple[list[dict[str, Any]], str | None]:
                found = View(conn, project, base_url).search_experiments(
                    {"order_by": "id ASC", "max_results": self.page_limit, "page_token": token},
                    self.page_limit)
                return found["experiments"], found.get("next_page_token")
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
                if code.startswith("22"):  # a value the database cannot take: a forged page_token
                    raise ApiError(400, "INVALID_PARAMETER_VALUE",
                                   f"A parameter is not valid: {first}") from exc
                if code in BUSY or code.startswith("08") or exc.connection_invalidated:
                    why = BUSY.get(code, "the connection to the database was lost")
                    raise ApiError(503, "TEMPORARILY_UNAVAILABLE",
                                   f"The database did not answer this read: {why} ({first}); "
                                   "try again") from exc
                raise ApiError(500, "INTERNAL_ERROR", f"The read failed: {first}") from exc
        raise AssertionError("unreachable")


class Handler(BaseHTTPRequestHandler):
    server: MlflowServer
    protocol_version = "HTTP/1.1"
    server_version = "toolkit-mlflow"
    # headers and body are two writes: without TCP_NODELAY each answer waits for the
    # client's delayed ACK (40 ms on Linux)
    disable_nagle_algorithm = True
    username: str | None = None  # who the request's token belongs to, for the access log

    def log_message(self, format: str, *args: Any) -> None:  # requests are not logged
        return

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        try:
            self._route()
        except ApiError as exc:
            self._send(exc.status, exc.document(), exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug: answer it as MLflow would, and say it where the operator looks
            problem = redact(f"{type(exc).__name__}: {exc}", self.server.api.secrets)
            out.warn(f"mlflow serve: {self.command} {urlsplit(self.path).path[:200]} failed: {problem}")
            self.close_connection = True
            self._send(500, {"error_code": "INTERNAL_ERROR",
                             "message": f"toolkit mlflow serve failed: {problem}"})

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "MALFORMED_REQUEST", "Content-Length is not a number") from None
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "MALFORMED_REQUEST", "The request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "MALFORMED_REQUEST", "The request body is not a JSON object")
        return body

    def _route(self) -> None:
        url = urlsplit(self.path)
        body = self._body()  # read it whatever the answer, so the connection stays usable
        match = ROUTE.match(url.path)
        if match is None:
            raise ApiError(404, "ENDPOINT_NOT_FOUND",
                           f"No such endpoint: {url.path[:200]}. The tracking URI of project P is "
                           f"http://HOST:PORT{TRACKING_PATH.format(project='P')}")
        endpoint, project = match["endpoint"], match["project"]
        api = self.server.api
        params = _params(body, parse_qs(url.query, keep_blank_values=True))
        self.username = api.authenticate(self.command, self.headers, params, project, endpoint)
        if self.command != "GET" and endpoint not in ("experiments/search", "runs/search"):
            # every other call that is not a GET writes: experiments/create, runs/create,
            # runs/log-*, runs/set-tag, runs/update, registered-models/create, ...
            raise ApiError(403, "FEATURE_DISABLED",
                           f"toolkit mlflow serve is read-only: {endpoint} would write, and nothing "
                           "was changed. Log runs to GitLab itself")
        base_url = f"http://{self.headers.get('Host') or self.server.address_text}"
        if endpoint == "experiments/list":
            self._stream_list(api.list_pages(project, base_url))
        elif endpoint in api.reads:
            self._send(200, api.answer(endpoint, project, base_url, params))
        else:
            raise ApiError(404, "ENDPOINT_NOT_FOUND",
                           f"{endpoint} is not served by toolkit mlflow serve (it serves "
                           f"{', '.join(sorted([*api.reads, 'experiments/list']))})")

    def _send(self, status: int, document: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> None:
        payload = json.dumps(document, ensure_ascii=False, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stream_list(self, pages: Iterator[list[dict[str, Any]]]) -> None:
        """Chunked: each page of experiments is sent as it is read."""
        first = next(pages)  # an error here (unknown project) is still a whole error document
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            if data:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        chunk(b'{"experiments":[')
        sep = b""
        try:
            for page in (first, *pages):
                for experiment in page:
                    chunk(sep + json.dumps(experiment, ensure_ascii=False, allow_nan=False).encode())
                    sep = b","
            chunk(b"]}")
        except Exception as exc:  # a half-sent document: end it, the client sees the cut
            out.warn(f"mlflow serve: experiments/list stopped half-way: {type(exc).__name__}: "
                     f"{getattr(exc, 'message', exc)}")
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")


class MlflowServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: Api):
        super().__init__(address, Handler)
        self.api = api

    @property
    def address_text(self) -> str:
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def serve_in_thread(server: MlflowServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="mlflow-serve", daemon=True)
    thread.start()
    return thread
