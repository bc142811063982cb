"""``toolkit mlflow serve``: GitLab's MLflow tracking API, read-only, over the database."""

from __future__ import annotations

import ipaddress
import signal
from pathlib import Path

import click
import sqlalchemy as sa

from toolkit import milestones
from toolkit.cli.context import app
from toolkit.engine.preflight import check_gitlab_database
from toolkit.errors import PreconditionRefused, UsageProblem
from toolkit.mlflow_api.auth import Authenticator, DatabaseTokens, FileTokens, TokenSource, missing_users
from toolkit.mlflow_api.server import TRACKING_PATH, Api, MlflowServer
from toolkit.mlflow_api.views import MAX_PAGE
from toolkit.output import out
from toolkit.verify.fingerprint import experiments_view, mlflow_source

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
@click.option("--lock-timeout-ms", type=click.IntRange(1), default=1000, show_default=True,
              help="How long a request waits for a lock (a milestone's schema change) before it "
                   "answers 503, which MLflow clients retry.")
@click.option("--statement-timeout-ms", type=click.IntRange(1), default=10_000, show_default=True,
              help="How long one query of a request may run.")
@click.option("--tokens-file", type=click.Path(path_type=Path, dir_okay=False),
              help="YAML list of {token, user, scopes} for a rehearsal copy: each request must carry "
                   "one of them (Authorization: Bearer or PRIVATE-TOKEN), checked as GitLab checks "
                   "a personal access token.")
@click.option("--gitlab-secrets", type=click.Path(path_type=Path, dir_okay=False),
              help="GitLab's /etc/gitlab/gitlab-secrets.json: the users' own personal access tokens "
                   "are checked against personal_access_tokens, by the digest GitLab stores.")
def serve(host: str, port: int, max_page_size: int, lock_timeout_ms: int,
          statement_timeout_ms: int, tokens_file: Path | None, gitlab_secrets: Path | None) -> None:
    """Serve GitLab's MLflow tracking API, read-only, until Ctrl-C.

    Answers the MLflow client's reads (experiments get, get-by-name, search, list; runs get
    and search; metric history; registered models get) from the database at whatever stage
    it is in: before milestone 1, during any milestone, after each, after rollbacks. The
    answers are GitLab's: experiment_id is the experiment's iid, run_id the candidate's eid.
    Calls that write are refused (403, FEATURE_DISABLED) and change nothing. Each request
    is one short READ ONLY transaction with its own timeouts.

    With --tokens-file or --gitlab-secrets every request needs a token, as on GitLab
    (read_api for GET, api for the POST searches) and the project access GitLab's policies
    ask (guest to read). Without either, reads are open, on loopback only.

    \b
    Point an MLflow script at project P of a rehearsal copy:
      toolkit --database-url postgresql:///scratch mlflow serve --port 5000
      MLFLOW_TRACKING_URI=http://127.0.0.1:5000/api/v4/projects/P/ml/mlflow python report.py

    Example: toolkit mlflow serve --port 0
    """
    sources: list[TokenSource] = []
    if gitlab_secrets is not None:
        sources.append(DatabaseTokens.from_secrets_file(gitlab_secrets))
    if tokens_file is not None:
        sources.append(FileTokens.from_file(tokens_file))
    if refusal := open_reads_refusal(host, bool(sources)):
        raise UsageProblem(*refusal)
    auth = Authenticator(sources) if sources else None
    state = app()
    target = state.target()
    api = Api.connect(target, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=statement_timeout_ms,
                      page_limit=max_page_size, auth=auth)
    try:
        with api.transaction() as conn:
            check_gitlab_database(conn, milestones.plan(), columns=False)  # exit 3, as every command
            source = mlflow_source(conn)
            if source is None:
                raise PreconditionRefused(
                    f"{target.describe()} has neither ml_experiments nor the toolkit's archive of it: "
                    "there is nothing an MLflow client could read",
                    "check --database-url (GitLab's database, usually gitlabhq_production)")
            _check_token_sources(conn, sources)
            projects = list(conn.execute(sa.text(
                f"SELECT e.project_id, count(*) AS n FROM ({experiments_view(conn, source)}) e "
                "GROUP BY e.project_id ORDER BY e.project_id")))
        try:
            server = MlflowServer((host, port), api)
        except OSError as exc:
            raise UsageProblem(f"Cannot listen on {host} port {port}: {exc.strerror or exc}",
                               "pass another --port (0 picks a free one)") from None
        address = f"http://{server.address_text}"
        if auth is not None:
            auth.gitlab_url = address
        out.say(f"Serving GitLab's MLflow API, read-only, at {address} (experiments read from: {source})")
        out.say(f"Tracking URI of project P: {address}{TRACKING_PATH.format(project='P')}")
        shown = ", ".join(f"{p.project_id} ({p.n} experiments)" for p in projects[:SHOWN_PROJECTS])
        more = f", and {len(projects) - SHOWN_PROJECTS} more" if len(projects) > SHOWN_PROJECTS else ""
        out.say(f"Projects: {shown or 'none yet'}{more}")
        first = projects[0].project_id if projects else 1
        out.say(f"For example: MLFLOW_TRACKING_URI={address}{TRACKING_PATH.format(project=first)}")
        if auth is None:
            out.say("No token source: anyone on this machine reads every project without a token "
                    "(GitLab asks for one); --tokens-file or --gitlab-secrets turn GitLab's checks on")
        else:
            out.say(f"Tokens: every request is checked as GitLab checks it, against {auth.describe()}")
        out.say("Ctrl-C stops it.")
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.server_close()
        out.say("Stopped.")
        state.finish({"address": address, "source": source,
                      "projects": {str(p.project_id): p.n for p in projects}})
    finally:
        api.close()


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
