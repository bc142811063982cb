"""Every connection string libpq accepts works as --database-url / TOOLKIT_DATABASE_URL.

Parsing is libpq's own (through psycopg); these tests pin what the toolkit makes of each
form, what psycopg is handed, how a URL is shown (every host, never a password), that bad
input is one line with exit code 2, and that a URL with several hosts, the first one dead,
reaches the live one and honours ``target_session_attrs``.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import toolkit, toolkit_process

from toolkit.cli.main import cli
from toolkit.conninfo import hosts_and_ports
from toolkit.db import Target, create_engine, parse_url
from toolkit.errors import ExitCode, UsageProblem


def _connect_args(raw: str) -> dict:
    """What SQLAlchemy's psycopg dialect hands to ``psycopg.connect`` for this URL."""
    url = parse_url(raw)
    _, params = sa.create_engine(url).dialect.create_connect_args(url)
    params.pop("context", None)
    return params


@pytest.mark.parametrize("raw, libpq, shown", [
    ("postgresql://gitlab@db1.internal:5432,db2.internal:5433/gitlabhq_production"
     "?target_session_attrs=read-write",
     {"host": "db1.internal,db2.internal", "port": "5432,5433", "user": "gitlab",
      "dbname": "gitlabhq_production", "target_session_attrs": "read-write"},
     "postgresql://gitlab@db1.internal:5432,db2.internal:5433/gitlabhq_production"
     "?target_session_attrs=read-write"),
    ("postgresql://gitlab@db1,db2,db3/gitlabhq_production",
     # SQLAlchemy adds an empty port per host: libpq's default for each, as without it.
     {"host": "db1,db2,db3", "port": ",,", "user": "gitlab", "dbname": "gitlabhq_production"},
     "postgresql://gitlab@db1,db2,db3/gitlabhq_production"),
    ("postgresql://gitlab@db1:6432,db2/gitlabhq_production",
     {"host": "db1,db2", "port": "6432,", "user": "gitlab", "dbname": "gitlabhq_production"},
     "postgresql://gitlab@db1:6432,db2/gitlabhq_production"),
    ("postgres://[::1]:5432,[fd00::2]:5433/gitlabhq_production?sslmode=verify-full",
     {"host": "::1,fd00::2", "port": "5432,5433", "dbname": "gitlabhq_production",
      "sslmode": "verify-full"},
     "postgresql://[::1]:5432,[fd00::2]:5433/gitlabhq_production?sslmode=verify-full"),
    ("postgresql://gitlab@[::1]:5432/gitlabhq_production",
     {"host": "::1", "port": 5432, "user": "gitlab", "dbname": "gitlabhq_production"},
     "postgresql://gitlab@[::1]:5432/gitlabhq_production"),
    ("host=/var/opt/gitlab/postgresql port=5432 dbname=gitlabhq_production user=gitlab",
     {"host": "/var/opt/gitlab/postgresql", "port": "5432", "user": "gitlab",
      "dbname": "gitlabhq_production"},
     "postgresql://gitlab@/gitlabhq_production?host=/var/opt/gitlab/postgresql&port=5432"),
    ("host=db1,db2 port=5432 dbname=gitlabhq_production target_session_attrs=primary",
     {"host": "db1,db2", "port": "5432,5432", "dbname": "gitlabhq_production",
      "target_session_attrs": "primary"},
     "postgresql://db1:5432,db2:5432/gitlabhq_production?target_session_attrs=primary"),
    ("postgresql:///gitlabhq_production?host=/var/run/postgresql",
     {"host": "/var/run/postgresql", "dbname": "gitlabhq_production"},
     "postgresql:///gitlabhq_production?host=/var/run/postgresql"),
    ("postgresql://%2Fvar%2Frun%2Fpostgresql/gitlabhq_production",
     {"host": "/var/run/postgresql", "dbname": "gitlabhq_production"},
     "postgresql:///gitlabhq_production?host=/var/run/postgresql"),
    ("postgres://gitlab@db.internal/gitlabhq_production?sslmode=require&connect_timeout=3"
     "&application_name=upgrade-ci",
     {"host": "db.internal", "user": "gitlab", "dbname": "gitlabhq_production",
      "sslmode": "require", "connect_timeout": "3", "application_name": "upgrade-ci"},
     # libpq's order of parameters, not the URL's
     "postgresql://gitlab@db.internal/gitlabhq_production?connect_timeout=3"
     "&application_name=upgrade-ci&sslmode=require"),
    # SQLAlchemy's own spelling (what `toolkit sandbox url` printed before, and tests use).
    ("postgresql+psycopg://postgres@/gitlab_sandbox?host=/tmp/sbx/socket&port=5432",
     {"host": "/tmp/sbx/socket", "port": "5432", "user": "postgres", "dbname": "gitlab_sandbox"},
     "postgresql://postgres@/gitlab_sandbox?host=/tmp/sbx/socket&port=5432"),
    ("postgresql://gitlab@/gitlabhq_production?host=db1,db2&port=5432,5433",
     {"host": "db1,db2", "port": "5432,5433", "user": "gitlab", "dbname": "gitlabhq_production"},
     "postgresql://gitlab@db1:5432,db2:5433/gitlabhq_production"),
])
def test_every_libpq_form_reaches_psycopg_as_libpq_would_read_it(raw, libpq, shown):
    assert _connect_args(raw) == libpq
    assert Target(parse_url(raw), "option").describe() == shown
    # What describe() shows is itself a URL libpq reads the same way.
    assert _connect_args(shown) == libpq


def test_the_database_name_is_known_in_every_form():
    """Milestone 4 asks the operator to type it: it must come out of any form."""
    for raw in ("postgresql://u@h1:5432,h2:5432/gitlabhq_production?target_session_attrs=read-write",
                "dbname=gitlabhq_production host=/var/run/postgresql",
                "postgresql:///gitlabhq_production?host=/var/run/postgresql",
                "postgres://u@h/gitlabhq_production"):
        assert parse_url(raw).database == "gitlabhq_production"


@pytest.mark.parametrize("raw, secret", [
    ("postgresql://gitlab:s3cr3t-pw@db1:5432,db2:5432/gitlabhq_production", "s3cr3t-pw"),
    ("postgresql://gitlab:p%40ss%2Fword@db1,db2/gitlabhq_production", "p@ss/word"),
    ("postgresql://gitlab@db1/gitlabhq_production?password=s3cr3t-pw", "s3cr3t-pw"),
    ("host=db1,db2 user=gitlab password='s3cr3t pw' dbname=gitlabhq_production", "s3cr3t pw"),
    ("host=db1 user=gitlab sslpassword=key-s3cr3t sslkey=/etc/gitlab/client.key", "key-s3cr3t"),
])
def test_describe_never_shows_a_password(raw, secret):
    shown = Target(parse_url(raw), "option").describe()
    assert secret not in shown and quote(secret, safe="") not in shown
    assert "***" in shown
    assert "db1" in shown and ("db2" in shown or "db2" not in raw)


@pytest.mark.parametrize("raw, says", [
    ("postgresql://gitlab:s3cr3t-pw@db1:5432,db2:notaport/gitlabhq_production", "not a port number"),
    ("postgresql://gitlab:s3cr3t-pw@db1/gitlabhq_production?no_such_option=1",
     'invalid URI query parameter: "no_such_option"'),
    ("host=db1,db2,db3 port=5432,5433 password=s3cr3t-pw", "3 host(s) but 2 ports"),
    ("port=5432,5433 dbname=gitlabhq_production password=s3cr3t-pw", "1 host(s) but 2 ports"),
    ("postgresql://gitlab:s3cr3t pw@db1/gitlabhq_production", "unexpected spaces"),
    ("just-a-hostname", 'missing "=" after "just-a-hostname"'),
    ("host='db1 password=s3cr3t-pw", "unterminated quoted string"),
    ("mysql://root:s3cr3t-pw@localhost/gitlab", "PostgreSQL only, not 'mysql'"),
    ("postgresql://gitlab:s3cr3t-pw@db1,db2/gitlabhq_production?target_session_attrs=readwrite",
     "target_session_attrs='readwrite' is not one of any, read-write, read-only, primary"),
    ("host=db1 sslmode=verify password=s3cr3t-pw", "sslmode='verify' is not one of disable"),
    ("postgresql://gitlab:s3cr3t-pw@db1/gitlabhq_production?connect_timeout=10s",
     "connect_timeout='10s' is not a whole number"),
    ("   ", "The database URL is empty"),
])
def test_bad_input_is_one_line_exit_2_and_never_shows_the_password(raw, says, monkeypatch):
    with pytest.raises(UsageProblem) as caught:
        parse_url(raw)
    assert says in caught.value.one_line()
    monkeypatch.delenv("TOOLKIT_DATABASE_URL", raising=False)
    for args, env in ((["--database-url", raw, "status"], None),
                      (["plan", "milestone-1"], {"TOOLKIT_DATABASE_URL": raw})):
        result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
        assert result.exit_code == ExitCode.USAGE, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert "s3cr3t" not in result.output and "Traceback" not in result.output
        assert says in result.output


# -- real connections -------------------------------------------------------------------


def _hostspec(host: str, port: str) -> str:
    spec = f"[{host}]" if ":" in host else quote(host, safe="")  # a socket directory: %2F...
    return f"{spec}:{port}" if port else spec


def _multi_host(db, dead: list[tuple[str, str]], query: str = "target_session_attrs=read-write") -> str:
    """The test database's URL in libpq's comma form: the dead hosts first, then the live one."""
    url = db.url
    user = quote(url.username or "", safe="")
    if url.password:
        user += ":" + quote(url.password, safe="")
    netloc = ",".join(_hostspec(h, p) for h, p in [*dead, *hosts_and_ports(url)])
    return f"postgresql://{user}@{netloc}/{url.database}" + (f"?{query}" if query else "")


class _Url:
    """What helpers.toolkit() needs of a database: the URL an operator would type."""

    def __init__(self, url_text: str):
        self.url_text = url_text


def test_status_through_several_hosts_the_first_a_socket_with_no_server(realistic_db, tmp_path):
    nobody = tmp_path / "no-server-here"
    nobody.mkdir()
    raw = _multi_host(realistic_db, [(str(nobody), "5432")])
    result = toolkit(_Url(raw), "status")
    assert result.exit_code == 0, result.output
    assert "milestone-1" in result.output


def test_plan_through_several_hosts_the_first_a_closed_port_via_the_environment(realistic_db):
    raw = _multi_host(realistic_db, [("127.0.0.1", "1")])
    done = toolkit_process(_Url(raw), "plan", "milestone-1", "--no-sql")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "milestone-1" in done.stdout


def test_keyword_value_conninfo_with_several_hosts(realistic_db, tmp_path):
    hosts = [(str(tmp_path), "5432"), *hosts_and_ports(realistic_db.url)]
    url = realistic_db.url
    raw = (f"host={','.join(h for h, _ in hosts)} port={','.join(p or '5432' for _, p in hosts)} "
           f"dbname={url.database} user={url.username} target_session_attrs=read-write")
    if url.password:
        raw += f" password='{url.password}'"
    result = toolkit(_Url(raw), "status")
    assert result.exit_code == 0, result.output


def _socket_of(db) -> tuple[str, str]:
    ((host, port),) = hosts_and_ports(db.url)
    assert host.startswith("/"), "the embedded test server listens on a Unix socket"
    return host, port or "5432"


def test_a_keyword_string_reaches_the_real_server(realistic_db):
    host, port = _socket_of(realistic_db)
    raw = f"host={host} port={port} dbname={realistic_db.name} user={realistic_db.url.username}"
    result = toolkit(_Url(raw), "status")
    assert result.exit_code == 0, result.output
    assert f"--database-url: postgresql://{realistic_db.url.username}@/{realistic_db.name}?host={host}" in result.output


@pytest.mark.parametrize("with_port", [True, False])
def test_a_percent_encoded_socket_host_reaches_the_real_server(realistic_db, with_port, monkeypatch):
    host, port = _socket_of(realistic_db)
    if not with_port:
        monkeypatch.setenv("PGPORT", port)  # libpq's port for a URL without one, as psql's
    netloc = quote(host, safe="") + (f":{port}" if with_port else "")
    raw = f"postgresql://{realistic_db.url.username}@{netloc}/{realistic_db.name}"
    assert "%2F" in raw
    result = toolkit(_Url(raw), "status")
    assert result.exit_code == 0, result.output
    assert f"?host={host}" in result.output  # shown as libpq reads it


def test_target_session_attrs_skips_a_server_that_does_not_match(realistic_db, tmp_path):
    """The live server is a primary: asking for a standby finds none, and says so in one line."""
    raw = _multi_host(realistic_db, [(str(tmp_path), "5432")], "target_session_attrs=standby")
    result = toolkit(_Url(raw), "status")
    assert result.exit_code == ExitCode.DATABASE, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "target_session_attrs=standby" in errors[0]  # the URL as described, every host in it
    assert str(tmp_path) in errors[0]


def test_every_host_dead_is_one_line_naming_them_all_without_the_password(sandbox_dir):
    raw = "postgresql://gitlab:s3cr3t-pw@127.0.0.1:1,127.0.0.1:2/gitlabhq_production?connect_timeout=3"
    result = CliRunner().invoke(cli, ["--database-url", raw, "status"], catch_exceptions=False)
    assert result.exit_code == ExitCode.DATABASE, result.output
    # The line every command says first (which database, from where), then one error line.
    using, error = result.output.strip().splitlines()
    assert using.startswith("Using the database given by --database-url: postgresql://gitlab:***@")
    assert error.startswith("error:") and "gitlab:***@127.0.0.1:1,127.0.0.1:2/gitlabhq_production" in error
    assert "s3cr3t-pw" not in result.output


def test_libpq_parameters_of_the_url_reach_the_session(realistic_db):
    """application_name from the URL is what the server sees (not overridden by the toolkit's)."""
    raw = _multi_host(realistic_db, [], "application_name=upgrade-ci&connect_timeout=7")
    engine = create_engine(parse_url(raw))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_setting('application_name')")).scalar() == "upgrade-ci"
            params = conn.connection.driver_connection.info.get_parameters()
            assert params.get("connect_timeout") == "7"
    finally:
        engine.dispose()
