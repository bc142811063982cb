"""The WSGI application of ``toolkit mlflow serve``: GitLab's routes over :class:`Api`.

It routes as GitLab's API does (``ROUTE`` and ``ARTIFACTS_ROUTE`` on the path as sent;
``experiments/list`` streamed page by page, an artifact in chunks), reads the path, the
query and the body through :mod:`toolkit.mlflow_api.inputs` (GitLab's Rack-level 400s for
malformed input), checks the token (:meth:`MlflowApp.check_access`), hands writes to
:meth:`Api.write` when the server takes them (``--allow-writes``) and refuses them otherwise,
writes one access log line per request, and answers a bug with GitLab's 500 and one
warning line, never a traceback.

URIs in answers (``artifact_uri``) start with the configured external URL, never with
the request's ``Host`` header, which any client sets as it likes.

``environ[USER_KEY]`` is the request's user once its token is checked, which the access
log shows (``-`` without one); ``environ[USER_ID_KEY]`` its id, which a write records as
the row's ``user_id``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from toolkit.errors import redact
from toolkit.mlflow_api import inputs
from toolkit.mlflow_api.artifacts import ARTIFACTS_ROUTE, Download
from toolkit.mlflow_api.auth import User
from toolkit.mlflow_api.views import ApiError
from toolkit.output import out

TRACKING_PATH = "/api/v4/projects/{project}/ml/mlflow"
ROUTE = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)/ml/mlflow/api/2\.0/(?:preview/)?mlflow/"
                   r"(?P<endpoint>[a-z0-9/_-]+)$")
# POSTs that only read (GitLab routes them without its write checks)
READ_ONLY_POSTS = frozenset({"experiments/search", "runs/search", "registered-models/get-latest-versions"})


class Api(Protocol):
    """What the application asks of the API it serves (``server.Api``, which builds this
    application, so it is described here rather than imported)."""

    @property
    def secrets(self) -> tuple[str, ...]: ...

    @property
    def allow_writes(self) -> bool: ...

    @property
    def reads(self) -> Mapping[str, Any]: ...

    @property
    def writes(self) -> Mapping[str, Any]: ...

    def authenticate(self, method: str, headers: Any, params: dict[str, Any], project: str,
                     endpoint: str) -> User | None: ...

    def write(self, endpoint: str, project: str, base_url: str, params: dict[str, Any],
              user_id: int | None) -> dict[str, Any]: ...

    def answer(self, endpoint: str, project: str, base_url: str,
               params: dict[str, Any]) -> dict[str, Any]: ...

    def artifact_list(self, project: str, base_url: str, params: dict[str, Any]) -> dict[str, Any]: ...

    def artifact_file(self, project: str, base_url: str, version: str, file_path: str) -> Download: ...

    def list_pages(self, project: str, base_url: str) -> Iterator[list[dict[str, Any]]]: ...


USER_KEY = "toolkit.user"
USER_ID_KEY = "toolkit.user_id"
JSON = [("Content-Type", "application/json")]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class StreamCut(Exception):
    """Raised into the server to end a streamed answer without its last chunk, so the
    client sees the cut; the reason was already said in one warning line."""


def status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, allow_nan=False).encode()


class MlflowApp:
    """One instance serves every request; it keeps no state between them."""

    def __init__(self, api: Api, external_url: str, *, access_log: bool = True):
        self.route, self.artifacts_route, self.tracking_path = ROUTE, ARTIFACTS_ROUTE, TRACKING_PATH
        self.read_only_posts = READ_ONLY_POSTS
        self.api = api
        self.external_url = external_url.rstrip("/")
        self.access_log = access_log

    # -- WSGI -----------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        environ.setdefault(USER_KEY, "-")
        try:
            status, headers, body = self._answer(environ)
        except Exception as exc:  # a bug: GitLab's 500, and one line where the operator looks
            status, headers, body = self._bug(environ, exc)
        if isinstance(body, list):
            headers = [*headers, ("Content-Length", str(sum(map(len, body))))]
        if environ.get("REQUEST_METHOD") == "HEAD":  # a GET's headers, no body
            close = getattr(body, "close", None)
            if close is not None:
                close()
            body = []
        start_response(status_line(status), headers)
        return _Logged(body, lambda: self.log(environ, status, started))

    def _answer(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:
        try:
            return self._route(environ)
        except inputs.Malformed:
            return 400, [("Content-Type", "text/plain")], [b"Bad Request"]
        except inputs.Refused as exc:
            return exc.status, JSON, [encode(exc.document())]
        except ApiError as exc:
            if exc.status >= 500 and exc.status != 503:
                out.warn(f"mlflow serve: {environ.get('REQUEST_METHOD')} {self._path(environ)} "
                         f"answered {exc.status}: {redact(exc.message, self.api.secrets)[:500]}")
            return exc.status, [*JSON, *exc.headers], [encode(exc.document())]

    def _route(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = inputs.text(environ.get("PATH_INFO", ""), "path")  # decoded: NUL, invalid UTF-8
        inputs.text(environ.get("HTTP_AUTHORIZATION", ""), "authorization")
        # routed as sent, as Grape routes: the project's full path stays one URL-encoded segment
        sent = inputs.text(_raw_path(environ), "path")
        if (artifact := self.artifacts_route.match(sent)) is not None:
            return self._artifacts(environ, method, artifact)
        params = self._params(environ)
        match = self.route.match(sent)
        if match is None:
            raise ApiError(404, "ENDPOINT_NOT_FOUND",
                           f"No such endpoint: {path[:200]}. The tracking URI of project P is "
                           f"{self.external_url}{self.tracking_path.format(project='P')}")
        endpoint, project = match["endpoint"], match["project"]
        api = self.api
        self.check_access(environ, method, endpoint, project, params)
        if method not in ("GET", "HEAD") and endpoint not in self.read_only_posts:
            # every other call that is not a GET writes: experiments/create, runs/create,
            # runs/log-*, runs/set-tag, runs/update, registered-models/create, ...
            if not api.allow_writes:
                raise ApiError(403, "FEATURE_DISABLED",
                               f"toolkit mlflow serve is read-only: {endpoint} would write, and nothing "
                               "was changed. Start it with --allow-writes to take writes, or log runs "
                               "to GitLab itself")
            if endpoint not in api.writes:
                raise ApiError(403, "FEATURE_DISABLED",
                               f"toolkit mlflow serve does not serve {endpoint}, and nothing was changed "
                               f"(it writes {', '.join(sorted(api.writes))})")
            return 200, JSON, [encode(api.write(endpoint, project, self.external_url, params,
                                                environ.get(USER_ID_KEY)))]
        if endpoint == "experiments/list":
            return 200, JSON, self._stream_list(api.list_pages(project, self.external_url))
        if endpoint in api.reads:
            return 200, JSON, [encode(api.answer(endpoint, project, self.external_url, params))]
        raise ApiError(404, "ENDPOINT_NOT_FOUND",
                       f"{endpoint} is not served by toolkit mlflow serve (it serves "
                       f"{', '.join(sorted([*api.reads, 'experiments/list']))})")

    def _artifacts(self, environ: dict[str, Any], method: str,
                   match: re.Match[str]) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:
        """GitLab's mlflow-artifacts GETs (list, download, the file sent in chunks); uploading
        is a write. Its parameters are the query's (an upload's body is a file, not JSON)."""
        project = match["project"]
        params = inputs.query_params(environ.get("QUERY_STRING", ""))
        self.check_access(environ, method, "artifacts", project, params)
        if method not in ("GET", "HEAD"):
            raise ApiError(403, "FEATURE_DISABLED", "toolkit mlflow serve does not take artifact uploads "
                           "(not even with --allow-writes), and nothing was changed. Log artifacts to "
                           "GitLab itself")
        if match["version"] is None:
            return 200, JSON, [encode(self.api.artifact_list(project, self.external_url, params))]
        download = self.api.artifact_file(project, self.external_url, match["version"], match["file"])
        return 200, download.headers(), download.chunks()

    def check_access(self, environ: dict[str, Any], method: str, endpoint: str, project: str,
                     params: dict[str, Any]) -> None:
        """The request's token checked as GitLab checks it (:meth:`Api.authenticate`), in
        GitLab's order: after the malformed-input checks and the route, before the read-only
        refusal and the parameters' types (Grape runs an endpoint's ``before`` blocks,
        ``check_api_read!`` among them, before its validations). A 401, 403 or 404 is raised
        as ApiError; the user goes to ``environ[USER_KEY]``, which the access log shows."""
        user = self.api.authenticate(method, _headers(environ), params, project, endpoint)
        if user is not None:
            environ[USER_KEY] = user.username
            environ[USER_ID_KEY] = user.id

    @staticmethod
    def _params(environ: dict[str, Any]) -> dict[str, Any]:
        """Query, then body over it (Grape's order). The body is read as JSON whatever its
        Content-Type (MLflow clients send JSON; so do scripts that forget the header); a JSON
        body that is not an object carries no parameters, as on GitLab."""
        params = inputs.query_params(environ.get("QUERY_STRING", ""))
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:  # the server checked it; a WSGI server that did not
            raise inputs.Malformed("content-length") from None
        raw = environ["wsgi.input"].read(length) if length > 0 else b""
        body = inputs.json_body(raw)
        if isinstance(body, dict):
            params.update(body)
        return params

    def _stream_list(self, pages: Iterator[list[dict[str, Any]]]) -> Iterable[bytes]:
        """A page of experiments is sent as it is read; the first is read before the
        answer starts, so an unknown project is still a whole error document."""
        first = next(pages)

        def chunks() -> Iterator[bytes]:
            yield b'{"experiments":['
            sep = b""
            try:
                for page in (first, *pages):
                    if page:
                        yield sep + b",".join(encode(experiment) for experiment in page)
                        sep = b","
            except Exception as exc:  # a half-sent document: end it, the client sees the cut
                out.warn(f"mlflow serve: experiments/list stopped half-way: {type(exc).__name__}: "
                         f"{redact(str(getattr(exc, 'message', exc)), self.api.secrets)[:500]}")
                raise StreamCut from None
            yield b"]}"

        return chunks()

    def _bug(self, environ: dict[str, Any], exc: Exception) -> tuple[int, list[tuple[str, str]], list[bytes]]:
        problem = redact(f"{type(exc).__name__}: {exc}", self.api.secrets)[:500]
        out.warn(f"mlflow serve: {environ.get('REQUEST_METHOD')} {self._path(environ)} failed: {problem}")
        # GitLab's answer to an exception no rescue_from names (API::Helpers#handle_api_exception)
        return 500, JSON, [encode({"message": "500 Internal Server Error"})]

    # -- the access log -------------------------------------------------------------------
    @staticmethod
    def _path(environ: dict[str, Any]) -> str:
        """The path as sent (percent-encoded, so no byte of it can forge a log line) and the
        names of the query's parameters, never their values."""
        raw = _raw_path(environ).encode("latin-1", "replace")
        path = quote(raw, safe="/-._~!$&'()*+,;=:@%")[:300]
        names = [name.decode("latin-1") for name, _ in
                 _query_names(environ.get("QUERY_STRING", "").encode("latin-1", "replace"))]
        if names:
            shown = [name if name.removesuffix("[]") in inputs.KNOWN_NAMES else "*" for name in names[:20]]
            path += "?" + "&".join(f"{name}=…" for name in shown)
        return path

    def log(self, environ: dict[str, Any], status: int, started: float) -> None:
        if not self.access_log:
            return
        ms = (time.monotonic() - started) * 1000
        user = quote(str(environ.get(USER_KEY) or "-"), safe="-._~@:")[:100]
        method = quote(str(environ.get("REQUEST_METHOD", "-")), safe="")[:20]
        client = quote(str(environ.get("REMOTE_ADDR") or "-"), safe=".:[]")[:60]
        out.note(f"access: {method} {self._path(environ)} {status} {ms:.0f} ms user={user} client={client}")


def _raw_path(environ: dict[str, Any]) -> str:
    """The path as the request line has it, still URL-encoded (waitress's ``PATH_INFO`` is
    decoded, which would split ``group%2Fproject`` in two)."""
    raw = str(environ.get("REQUEST_URI") or "")
    if not raw.startswith("/"):  # absolute-form (http://host/path) or none
        raw = urlsplit(raw).path if raw else quote(environ.get("PATH_INFO", "").encode("latin-1", "replace"),
                                                   safe="/")
    return raw.split("?", 1)[0].split("#", 1)[0]


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    """The request's headers by their names (``PRIVATE-TOKEN``), from the WSGI environ."""
    found = {name[5:].replace("_", "-"): value for name, value in environ.items()
             if name.startswith("HTTP_") and isinstance(value, str)}
    for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if name in environ:
            found[name.replace("_", "-")] = str(environ[name])
    return found


def _query_names(raw: bytes) -> list[tuple[bytes, bytes]]:
    pairs = []
    for part in raw.split(b"&")[:inputs.MAX_QUERY_FIELDS]:
        if part:
            name = part.split(b"=", 1)[0]
            pairs.append((name, b""))
    return pairs


class _Logged:
    """The answer's body; when the server is done with it (sent, or the client gone) the
    access log line is written, with the time the whole answer took."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]):
        self.body = body
        self.done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.done()
