"""``toolkit mlflow serve``: GitLab's MLflow tracking API over the database (read-only unless
``--allow-writes``)."""

from __future__ import annotations

import ipaddress
import resource
import signal
from pathlib import Path
from urllib.parse import urlsplit

import click
import sqlalchemy as sa

from toolkit import milestones
from toolkit.cli import params
from toolkit.cli.context import app
from toolkit.engine.preflight import check_gitlab_database
from toolkit.errors import PreconditionRefused, UsageProblem
from toolkit.mlflow_api.artifacts import OMNIBUS_PACKAGES_DIR
from toolkit.mlflow_api.auth import Authenticator, DatabaseTokens, FileTokens, TokenSource, missing_users
from toolkit.mlflow_api.server import MIB, TRACKING_PATH, Api, Limits, MlflowServer
from toolkit.mlflow_api.views import MAX_PAGE
from toolkit.output import out
from toolkit.verify.mlflow_view import experiments_view, mlflow_source
from toolkit.words import counted

SHOWN_PROJECTS = 20


@click.group()
def mlflow() -> None:
    """GitLab's MLflow-compatible API over the database, for MLflow scripts.

    Example: toolkit mlflow serve --port 0
    """


@mlflow.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any other than loopback needs --tokens-file or "
                   "--gitlab-secrets: without a token source every project is readable by anyone.")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True,
              help="Port to listen on (0: any free one, printed).")
@click.option("--max-page-size", type=click.IntRange(1, MAX_PAGE), default=MAX_PAGE, show_default=True,
              help="Largest page of experiments, runs or metric history one request answers "
                   "(GitLab's is 1000); clients follow next_page_token.")
@click.option("--lock-timeout-ms", type=params.TIMEOUT_MS, default=1000, show_default=True,
              help="How long a request waits for a lock (a milestone's schema change) before it "
                   "answers 503, which MLflow clients retry.")
@click.option("--statement-timeout-ms", type=params.TIMEOUT_MS, default=10_000, show_default=True,
              help="How long one query of a request may run.")
@click.option("--packages-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="GitLab's package store on local storage (Omnibus: "
                   f"{OMNIBUS_PACKAGES_DIR}), or a copy: model version artifacts are downloaded "
                   "from it. Without it they are listed, and a download says where the file is.")
@click.option("--tokens-file", type=click.Path(path_type=Path, dir_okay=False),
              help="YAML list of {token, user, scopes} for a rehearsal copy: each request must carry "
                   "one of them (Authorization: Bearer or PRIVATE-TOKEN), checked as GitLab checks "
                   "a personal access token.")
@click.option("--gitlab-secrets", type=click.Path(path_type=Path, dir_okay=False),
              help="GitLab's /etc/gitlab/gitlab-secrets.json: the users' own personal access tokens "
                   "are checked against personal_access_tokens, by the digest GitLab stores.")
@click.option("--lenient", is_flag=True,
              help="Accept order_by as a list (what MLflow clients send, mlflow/mlflow#13082), "
                   "reading its first entry; GitLab refuses it with 400 'order_by is invalid', "
                   "and so does the server without this flag.")
@click.option("--external-url", metavar="URL",
              help="The server's URL as clients reach it (http[s]://HOST[:PORT][/PATH]), used in "
                   "every URI of an answer (artifact_uri); the request's Host header never is. "
                   "Default: http://<the address it listens on>.")
@click.option("--max-body-mb", type=click.IntRange(1, 1024), default=Limits.max_body_bytes // MIB,
              show_default=True,
              help="Largest request body in MiB; a larger one is answered 413 without being read "
                   "(MLflow's largest request, log-batch at its own limits, is under 2 MiB).")
@click.option("--max-header-kb", type=click.IntRange(1, 1024), default=Limits.max_header_bytes // 1024,
              show_default=True, help="Largest request line and headers in KiB; larger is answered 431.")
@click.option("--idle-timeout-s", type=click.IntRange(1, 3600), default=Limits.idle_timeout_s,
              show_default=True,
              help="A connection that sends nothing and waits for no answer this long is closed.")
@click.option("--request-timeout-s", type=click.IntRange(1, 3600), default=Limits.request_timeout_s,
              show_default=True,
              help="A request (headers and body) must arrive whole within this many seconds of its "
                   "first byte, or its connection is closed: a client trickling bytes holds nothing "
                   "for long.")
@click.option("--max-connections", type=click.IntRange(1, 10_000), default=Limits.max_connections,
              show_default=True,
              help="Open connections at most; beyond it new ones wait in the listen queue. A waiting "
                   "or slow connection holds a socket, never a thread.")
@click.option("--threads", type=click.IntRange(1, 64), default=Limits.threads, show_default=True,
              help="Requests answered at once (each holds one database connection while it reads).")
@click.option("--allow-writes", is_flag=True,
              help="Take MLflow writes (experiments create, set-experiment-tag, delete; runs create, "
                   "update, delete, log-metric, log-parameter, set-tag, log-batch; registered models "
                   "create, update, delete; model versions create, update) with GitLab's semantics, "
                   "iids from GitLab's internal_ids. Each write is one transaction that "
                   "follows the blueprint's stage, read in it; during a milestone's schema change it "
                   "answers 503 with Retry-After (clients retry). Off by default: writes are refused "
                   "(403) and nothing is changed.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One line per request on stderr: method, path and the names of its query "
                   "parameters (never their values, never a token), status, milliseconds, user, "
                   "client address.")
def serve(host: str, port: int, max_page_size: int, lock_timeout_ms: int, statement_timeout_ms: int,
          tokens_file: Path | None, gitlab_secrets: Path | None, lenient: bool,
          packages_dir: Path | None,
          external_url: str | None, max_body_mb: int, max_header_kb: int, idle_timeout_s: int,
          request_timeout_s: int, max_connections: int, threads: int, allow_writes: bool,
          access_log: bool) -> None:
    """Serve GitLab's MLflow tracking API until Ctrl-C: reads, and writes with --allow-writes.

    Answers the MLflow client's reads (experiments get, get-by-name, search, list; runs get
    and search; metric history; registered models get, get-latest-versions, search, alias;
    model versions get, get-download-uri; mlflow-artifacts list and download, the files
    from --packages-dir) from the database at whatever stage it is in: before milestone 1,
    during any milestone, after each, after rollbacks. The
    answers are GitLab's: experiment_id is the experiment's iid, run_id the candidate's eid.
    Each read is one short READ ONLY transaction with its own timeouts. Calls that write
    are refused (403, FEATURE_DISABLED) and change nothing, unless --allow-writes: then
    the tracking and registry writes are GitLab's, each one read-write transaction that
    reads the blueprint's stage and writes where that stage says (artifact uploads stay
    refused).

    With --tokens-file or --gitlab-secrets every request needs a token, as on GitLab
    (read_api for GET, api for the POST searches and writes) and the project access
    GitLab's policies ask (guest to read, developer to write). Without either, reads (and
    writes) are open, on loopback only.

    It runs on waitress with request limits (body, headers, idle and request timeouts,
    connections, threads: the options below), answers malformed input with GitLab's 400s,
    starts URIs with --external-url (never the request's Host), and writes one access log
    line per request on stderr (no query values, no headers, never a token).

    \b
    Point an MLflow script at project P of a rehearsal copy:
      toolkit --database-url postgresql:///scratch mlflow serve --port 5000
      MLFLOW_TRACKING_URI=http://127.0.0.1:5000/api/v4/projects/P/ml/mlflow python report.py

    Example: toolkit mlflow serve --port 0
    """
    sources = _token_sources(host, tokens_file, gitlab_secrets)
    auth = Authenticator(sources) if sources else None
    if external_url is not None:
        external_url = checked_external_url(external_url)
    limits = Limits(max_body_bytes=max_body_mb * MIB, max_header_bytes=max_header_kb * 1024,
                    idle_timeout_s=idle_timeout_s, request_timeout_s=request_timeout_s,
                    max_connections=max_connections, threads=threads)
    target = app().target()
    api = Api.connect(target, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=statement_timeout_ms,
                      page_limit=max_page_size, auth=auth, lenient=lenient, packages_dir=packages_dir,
                      threads=threads, allow_writes=allow_writes)
    try:
        source, projects = _what_it_serves(api, target.describe(), sources)
        server = _listening(host, port, api, limits, external_url, access_log)
        listening = f"http://{server.address_text}"
        address = server.external_url
        _say_serving(listening, address, source, projects, packages_dir=packages_dir, auth=auth,
                     allow_writes=allow_writes)
        _serve_until_stopped(server)
        app().finish({"address": listening, "external_url": address, "source": source,
                      "projects": {str(p.project_id): p.n for p in projects}})
    finally:
        api.close()


def _token_sources(host: str, tokens_file: Path | None, gitlab_secrets: Path | None) -> list[TokenSource]:
    """Where tokens are checked (GitLab's database, a tokens file, both); refused when there
    is none and ``host`` is not loopback."""
    sources: list[TokenSource] = []
    if gitlab_secrets is not None:
        sources.append(DatabaseTokens.from_secrets_file(gitlab_secrets))
    if tokens_file is not None:
        sources.append(FileTokens.from_file(tokens_file))
    if refusal := open_reads_refusal(host, bool(sources)):
        raise UsageProblem(*refusal)
    return sources


def _what_it_serves(api: Api, database: str, sources: list[TokenSource]) -> tuple[str, list[sa.Row]]:
    """Before listening: a GitLab database (exit 3 otherwise, as every command), where the
    MLflow view reads experiments at its stage, token sources that work, and each project
    with its number of experiments."""
    with api.transaction() as conn:
        check_gitlab_database(conn, milestones.plan(), columns=False)  # exit 3, as every command
        source = mlflow_source(conn)
        if source is None:
            raise PreconditionRefused(
                f"{database} has neither ml_experiments nor the toolkit's archive of it: "
                "there is nothing an MLflow client could read",
                "check --database-url (GitLab's database, usually gitlabhq_production)")
        _check_token_sources(conn, sources)
        projects = list(conn.execute(sa.text(
            f"SELECT e.project_id, count(*) AS n FROM ({experiments_view(conn, source)}) e "
            "GROUP BY e.project_id ORDER BY e.project_id")))
    return source, projects


def _listening(host: str, port: int, api: Api, limits: Limits, external_url: str | None,
               access_log: bool) -> MlflowServer:
    """The server, bound (with room for its connections' files), its URL the one tokens are
    checked for; a port taken or a host that is not one is the operator's to change."""
    _allow_open_files(limits.max_connections)
    try:
        server = MlflowServer((host, port), api, limits=limits, external_url=external_url,
                              access_log=access_log)
    except (OSError, ValueError) as exc:
        raise UsageProblem(f"Cannot listen on {host} port {port}: "
                           f"{getattr(exc, 'strerror', None) or exc}",
                           "pass another --host or --port (0 picks a free one)") from None
    if api.auth is not None:  # the GitLab whose tokens it checks is the one clients reach
        api.auth.gitlab_url = server.external_url
    return server


def _say_serving(listening: str, address: str, source: str, projects: list[sa.Row], *,
                 packages_dir: Path | None, auth: Authenticator | None, allow_writes: bool) -> None:
    """What is served, where, to whom: the lines an operator reads before pointing a client."""
    mode = "reads and writes" if allow_writes else "read-only"
    out.say(f"Serving GitLab's MLflow API, {mode}, at {listening} (experiments read from: {source})")
    if address != listening:
        out.say(f"External URL (in every URI it answers): {address}")
    out.say(f"Tracking URI of project P: {address}{TRACKING_PATH.format(project='P')}")
    shown = ", ".join(f"{p.project_id} ({counted(p.n, 'experiment')})" for p in projects[:SHOWN_PROJECTS])
    more = f", and {len(projects) - SHOWN_PROJECTS} more" if len(projects) > SHOWN_PROJECTS else ""
    out.say(f"Projects: {shown or 'none yet'}{more}")
    first = projects[0].project_id if projects else 1
    out.say(f"For example: MLFLOW_TRACKING_URI={address}{TRACKING_PATH.format(project=first)}")
    out.say(f"Artifacts: downloaded from {packages_dir}" if packages_dir else
            "Artifacts: listed; downloads need --packages-dir (GitLab's package store)")
    if auth is None:
        out.say("No token source: anyone on this machine reads every project without a token "
                "(GitLab asks for one); --tokens-file or --gitlab-secrets turn GitLab's checks on")
    else:
        out.say(f"Tokens: every request is checked as GitLab checks it, against {auth.describe()}")
    if allow_writes:
        out.say("Writes: taken (--allow-writes), as GitLab takes them, each one transaction at the "
                "blueprint's stage; 503 with Retry-After while a schema change holds the tables")
    out.say("Ctrl-C stops it.")


def _serve_until_stopped(server: MlflowServer) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the listening socket, and say so."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    out.say("Stopped.")


def open_reads_refusal(host: str, has_tokens: bool) -> tuple[str, str] | None:
    """Why listening on ``host`` is refused (problem, next step), or None: without a token
    source every request is let in, which only loopback may offer."""
    if has_tokens or _loopback(host):
        return None
    return (f"Listening on {host} without a token source would let anyone who reaches it read every "
            "project's experiments", "pass --tokens-file or --gitlab-secrets, or --host 127.0.0.1")


def _check_token_sources(conn: sa.Connection, sources: list[TokenSource]) -> None:
    for source in sources:
        if isinstance(source, DatabaseTokens):
            if conn.execute(sa.text("SELECT to_regclass('personal_access_tokens')")).scalar() is None:
                raise PreconditionRefused("--gitlab-secrets: this database has no personal_access_tokens "
                                          "table", "check --database-url, or use --tokens-file")
        elif missing := missing_users(conn, source.users()):
            raise UsageProblem(f"--tokens-file names users the database lacks: {', '.join(missing[:10])}",
                               "give each token a username or id from the users table")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checked_external_url(raw: str) -> str:
    """``--external-url`` as it starts URIs: http or https, a host, an optional port and
    path, nothing else (no user, query or fragment); without a trailing slash."""
    problem = None
    try:
        url = urlsplit(raw.strip())
        port = url.port  # a port that is not a number raises here
    except ValueError as exc:
        problem, url, port = str(exc), None, None
    if url is not None:
        if url.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not url.hostname:
            problem = "it names no host"
        elif url.username is not None or url.password is not None:
            problem = "it must not carry a user or password"
        elif url.query or url.fragment or "?" in raw or "#" in raw:
            problem = "it must not have a query or fragment"
        elif any(c.isspace() or not c.isprintable() for c in raw.strip()):
            problem = "it must not contain spaces or control characters"
        elif port == 0:
            problem = "port 0 is no port a client can reach"
    if problem:
        raise UsageProblem(f"--external-url {raw[:200]!r} is not usable: {problem}",
                           "pass the URL clients reach the server at, e.g. https://mlflow.example.com")
    return raw.strip().rstrip("/")


def _allow_open_files(connections: int) -> None:
    """Raise the soft limit of open files towards the hard one so that --max-connections
    sockets (and the database pool, and files) fit; warn when they cannot."""
    needed = connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
        if soft < needed:
            out.warn(f"--max-connections {connections} needs about {needed} open files; this process "
                     f"may open {soft} (ulimit -n): beyond that, connections are refused")
