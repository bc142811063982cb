"""Where the database comes from, in order, as psql would find it, and what is said about it.

``--database-url``, then ``--gitlab-config`` (GitLab's database.yml): the command line
first; then ``TOOLKIT_DATABASE_URL``, then libpq's own environment (PGHOST, PGHOSTADDR,
PGPORT, PGDATABASE, PGUSER, PGSERVICE, with PGSERVICEFILE, PGPASSWORD and
PGPASSFILE/~/.pgpass honoured as libpq honours them), then the sandbox. Every command names its source in one line, never with
a password. Connection-parameter mistakes are usage errors (exit 2) naming the parameter;
a server that asks for a password nobody gave says so, and how to give one.

Every connection here is to the real test server (its Unix socket, trust authentication;
a role of the test's own gets a password or peer rule in pg_hba.conf where a test needs
one), never a mock.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers import hba_role

from toolkit.cli.main import cli
from toolkit.conninfo import hosts_and_ports
from toolkit.errors import ExitCode

LIBPQ_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE", "PGSERVICEFILE",
                   "PGPASSWORD", "PGPASSFILE", "PGSSLMODE", "PGAPPNAME", "PGCONNECT_TIMEOUT",
                   "PGTARGETSESSIONATTRS", "PGOPTIONS", "PGSYSCONFDIR")


@pytest.fixture
def clean(sandbox_dir, monkeypatch, tmp_path):
    """No database given anywhere, the sandbox not running, no ~/.pgpass of the user's."""
    for name in LIBPQ_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))  # never the user's own
    monkeypatch.setenv("PGSYSCONFDIR", str(tmp_path / "no-sysconf"))  # no system service file
    return tmp_path


def _socket(db) -> tuple[str, str]:
    ((host, port),) = hosts_and_ports(db.url)
    assert host.startswith("/"), "the embedded test server listens on a Unix socket"
    return host, port or "5432"


def run(*args: str, env: dict | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def _using(result: Result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Using ")]
    assert len(lines) == 1, result.output
    return lines[0]


def _errors(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def _libpq_env(db, **extra: str) -> dict:
    host, port = _socket(db)
    return {"PGHOST": host, "PGPORT": port, "PGUSER": db.url.username, "PGDATABASE": db.name, **extra}


# -- libpq's environment -----------------------------------------------------------------


def test_libpq_environment_variables_name_the_database_as_psql_would(realistic_db, clean):
    result = run("status", env=_libpq_env(realistic_db))
    assert result.exit_code == 0, result.output
    assert "milestone-1" in result.output
    line = _using(result)
    assert "libpq's environment" in line and "PGHOST" in line and "PGDATABASE" in line, line
    assert realistic_db.name in line and "sandbox" not in line


def test_libpq_variables_pointing_nowhere_fail_there_not_on_the_sandbox(realistic_db, clean):
    result = run("status", env={"PGDATABASE": realistic_db.name, "PGHOST": str(clean / "no-server")})
    assert result.exit_code == ExitCode.DATABASE, result.output  # nothing listens there
    assert "sandbox" not in result.output
    line = _using(result)
    assert "PGHOST" in line and "PGDATABASE" in line and realistic_db.name in line, line


def test_a_service_file_is_read_as_libpq_reads_it(realistic_db, clean):
    host, port = _socket(realistic_db)
    services = clean / "pg_service.conf"
    services.write_text(f"[gitlab]\nhost={host}\nport={port}\ndbname={realistic_db.name}\n"
                        f"user={realistic_db.url.username}\n")
    result = run("status", env={"PGSERVICEFILE": str(services), "PGSERVICE": "gitlab"})
    assert result.exit_code == 0, result.output
    line = _using(result)
    assert "service gitlab" in line and realistic_db.name in line, line


def test_an_unknown_service_is_a_usage_error_naming_it(realistic_db, clean):
    services = clean / "pg_service.conf"
    services.write_text("[other]\nhost=/nowhere\n")
    result = run("status", env={"PGSERVICEFILE": str(services), "PGSERVICE": "gitlab"})
    assert result.exit_code == ExitCode.USAGE, result.output
    (error,) = _errors(result)
    assert "service" in error and "gitlab" in error and "PGSERVICE" in error, error


@pytest.mark.parametrize("name, value, says", [
    ("PGPORT", "99999", "PGPORT='99999' is not a port number"),
    ("PGSSLMODE", "bogus", "PGSSLMODE='bogus'"),
    ("PGCONNECT_TIMEOUT", "soon", "PGCONNECT_TIMEOUT='soon' is not a whole number"),
])
def test_a_bad_libpq_variable_is_a_usage_error_naming_it(realistic_db, clean, name, value, says):
    result = run("status", env=_libpq_env(realistic_db, **{name: value}))
    assert result.exit_code == ExitCode.USAGE, result.output
    (error,) = _errors(result)
    assert says in error, error


def test_a_bad_libpq_variable_under_a_url_is_a_usage_error_naming_it(realistic_db, clean):
    """libpq applies PGSSLMODE to a URL without sslmode too: a typo there is still exit 2."""
    result = run("--database-url", realistic_db.url_text, "status", env={"PGSSLMODE": "bogus"})
    assert result.exit_code == ExitCode.USAGE, result.output
    (error,) = _errors(result)
    assert "sslmode" in error and "PGSSLMODE" in error and "bogus" in error, error


def test_database_url_and_toolkit_variable_come_before_libpq(realistic_db, clean):
    wrong = _libpq_env(realistic_db, PGDATABASE="tk_no_such_database")
    by_option = run("--database-url", realistic_db.url_text, "status", env=wrong)
    assert by_option.exit_code == 0, by_option.output
    assert "--database-url" in _using(by_option)
    by_variable = run("status", env={**wrong, "TOOLKIT_DATABASE_URL": realistic_db.url_text})
    assert by_variable.exit_code == 0, by_variable.output
    assert "TOOLKIT_DATABASE_URL" in _using(by_variable)


def test_pgpassword_is_used_and_never_shown(realistic_db, clean, password_role):
    env = _libpq_env(realistic_db, PGUSER=password_role, PGPASSWORD="right-one")
    result = run("status", env=env)
    assert result.exit_code == 0, result.output
    assert "right-one" not in result.output
    assert f"{password_role}:***@" in _using(result)


def test_a_pgpass_file_is_used(realistic_db, clean, password_role):
    host, port = _socket(realistic_db)
    passfile = clean / "pgpass"
    passfile.write_text(f"{host}:{port}:{realistic_db.name}:{password_role}:right-one\n")
    passfile.chmod(0o600)
    result = run("status", env=_libpq_env(realistic_db, PGUSER=password_role, PGPASSFILE=str(passfile)))
    assert result.exit_code == 0, result.output
    assert "right-one" not in result.output


# -- a password the server asks for ------------------------------------------------------


def test_a_missing_password_says_one_is_needed_and_how_to_give_it(realistic_db, clean, password_role):
    url = realistic_db.url.set(username=password_role).render_as_string(hide_password=False)
    for result in (run("--database-url", url, "status"),
                   run("status", env=_libpq_env(realistic_db, PGUSER=password_role))):
        assert result.exit_code == ExitCode.DATABASE, result.output
        (error,) = _errors(result)
        assert "password" in error and "server is up" not in error, error
        assert "PGPASSWORD" in error and ".pgpass" in error, error
        assert password_role in error


def test_reconnect_does_not_wait_out_a_password_or_a_parameter_nobody_gave(realistic_db, clean,
                                                                             password_role):
    no_password = realistic_db.url.set(username=password_role).render_as_string(hide_password=False)
    for url, env, code in ((no_password, None, ExitCode.DATABASE),
                           (realistic_db.url_text, {"PGSSLMODE": "bogus"}, ExitCode.USAGE)):
        result = run("--database-url", url, "migrate", "milestone-1", "--yes", "--reconnect", "1", env=env)
        assert result.exit_code == code, result.output
        assert "reconnecting" not in result.output and "cannot be reached" not in result.output, result.output


def test_a_pgpass_file_libpq_ignores_for_its_permissions_is_named(realistic_db, clean, password_role):
    host, port = _socket(realistic_db)
    passfile = clean / "pgpass"
    passfile.write_text(f"{host}:{port}:*:{password_role}:right-one\n")
    passfile.chmod(0o644)
    result = run("status", env=_libpq_env(realistic_db, PGUSER=password_role, PGPASSFILE=str(passfile)))
    assert result.exit_code == ExitCode.DATABASE, result.output
    (error,) = _errors(result)
    assert str(passfile) in error and "chmod 600" in error, error


def test_peer_authentication_says_which_os_user_to_run_as(realistic_db, clean, peer_role):
    url = realistic_db.url.set(username=peer_role).render_as_string(hide_password=False)
    result = run("--database-url", url, "status")
    assert result.exit_code == ExitCode.DATABASE, result.output
    (error,) = _errors(result)
    assert "peer authentication" in error.lower() and "operating-system user" in error, error
    assert "server is up" not in error


# -- connection parameters are usage errors -----------------------------------------------


@pytest.mark.parametrize("query, says", [
    ("sslmode=bogus", "sslmode='bogus'"),
    ("port=99999", "port='99999' is not a port number"),
])
def test_bad_connection_parameters_are_exit_2_naming_the_parameter(realistic_db, clean, query, says):
    raw = realistic_db.url_text + ("&" if "?" in realistic_db.url_text else "?") + query
    if query.startswith("port="):
        host, _ = _socket(realistic_db)
        raw = f"host={host} port=99999 dbname={realistic_db.name}"
    result = run("--database-url", raw, "status")
    assert result.exit_code == ExitCode.USAGE, result.output
    (error,) = _errors(result)
    assert says in error, error


# -- GitLab's database.yml ----------------------------------------------------------------


OMNIBUS = """\
# This file is managed by gitlab-ctl. Manual changes will be
# erased! To change the contents below, edit /etc/gitlab/gitlab.rb
# and run `sudo gitlab-ctl reconfigure`.

production:
  main:
    adapter: postgresql
    encoding: unicode
    collation:
    database: {database}
    username: "{username}"
    password: {password}
    host: "{host}"
    port: {port}
    socket:
    sslmode:
    sslcompression: 0
    sslrootcert:
    sslca:
    load_balancing: {{"hosts":[]}}
    prepared_statements: false
    database_tasks: true
    statement_limit: 1000
    connect_timeout:
    keepalives:
    keepalives_idle:
    keepalives_interval:
    keepalives_count:
    tcp_user_timeout:
    application_name:
    variables:
      statement_timeout:
  ci:
    adapter: postgresql
    database: gitlabhq_production_ci
    host: "/nowhere"
"""

SINGLE = """\
production:
  adapter: postgresql
  encoding: unicode
  database: {database}
  username: {username}
  password: {password}
  host: {host}
  port: {port}
  pool: 10

development:
  adapter: postgresql
  database: gitlabhq_development
"""


def _gitlab_config(db, path: Path, template: str = OMNIBUS, **values: object) -> Path:
    host, port = _socket(db)
    fields = {"database": db.name, "username": db.url.username, "password": "", "host": host,
              "port": port, **values}
    path.write_text(template.format(**fields))
    return path


def test_gitlab_config_reads_the_main_database_of_production(realistic_db, clean):
    config = _gitlab_config(realistic_db, clean / "database.yml")
    result = run("--gitlab-config", str(config), "status")
    assert result.exit_code == 0, result.output
    assert "milestone-1" in result.output
    line = _using(result)
    assert str(config) in line and "production.main" in line and realistic_db.name in line, line


def test_gitlab_config_in_the_single_database_format(realistic_db, clean):
    config = _gitlab_config(realistic_db, clean / "database.yml", SINGLE)
    result = run("--gitlab-config", str(config), "status")
    assert result.exit_code == 0, result.output
    assert "production" in _using(result) and realistic_db.name in _using(result)


def test_gitlab_config_with_a_password_never_shows_it(realistic_db, clean, password_role):
    config = _gitlab_config(realistic_db, clean / "database.yml", username=password_role,
                            password='"right-one"')
    result = run("--gitlab-config", str(config), "status")
    assert result.exit_code == 0, result.output
    assert "right-one" not in result.output
    assert f"{password_role}:***@" in _using(result)


def test_gitlab_config_comes_before_libpq_environment_and_says_so(realistic_db, clean):
    """An option on the command line wins over the environment (a stray PGHOST)."""
    config = _gitlab_config(realistic_db, clean / "database.yml")
    env = {**_libpq_env(realistic_db), "PGDATABASE": "tk_no_such_database"}
    result = run("--gitlab-config", str(config), "status", env=env)
    assert result.exit_code == 0, result.output
    line = _using(result)
    assert str(config) in line and "in the environment not used: --gitlab-config comes first" in line, line


@pytest.mark.parametrize("text, says", [
    (None, "does not exist"),
    ("development:\n  adapter: postgresql\n", "no production section"),
    ("production:\n  main:\n    adapter: mysql2\n    database: gitlab\n", "mysql2"),
    ("production:\n  main:\n    adapter: postgresql\n    database: gitlab\n"
     "    password: <%= ENV['DB_PASSWORD'] %>\n", "ERB"),
    ("production: [unclosed\n", "not valid YAML"),
    ("production:\n  main:\n    adapter: postgresql\n    database: gitlab\n    port: 99999\n",
     "port='99999' is not a port number"),
])
def test_a_gitlab_config_that_cannot_be_used_is_a_usage_error(clean, text, says):
    config = clean / "database.yml"
    if text is not None:
        config.write_text(text)
    result = run("--gitlab-config", str(config), "status")
    assert result.exit_code == ExitCode.USAGE, result.output
    (error,) = _errors(result)
    assert says in error and str(config) in error, error
    assert "DB_PASSWORD" not in error or says == "ERB"


def test_the_sandbox_comes_last_and_names_every_source_it_looked_for(clean):
    result = run("status")
    assert result.exit_code == ExitCode.REFUSED, result.output
    (error,) = _errors(result)
    for source in ("--database-url", "TOOLKIT_DATABASE_URL", "PGHOST", "--gitlab-config",
                   "toolkit sandbox start"):
        assert source in error, error


# -- roles of the test's own -------------------------------------------------------------


@pytest.fixture
def password_role(realistic_db):
    """A role that must give its password (scram) over the test server's socket."""
    name = f"tk_src_pw_{os.getpid()}"
    yield from hba_role(realistic_db, name, (f"local all {name} scram-sha-256",), "right-one")


@pytest.fixture
def peer_role(realistic_db):
    """A role whose name is no operating-system user here: peer authentication fails."""
    name = f"tk_src_peer_{os.getpid()}"
    yield from hba_role(realistic_db, name, (f"local all {name} peer",), None)


def test_database_yml_keys_are_read_as_rails_reads_them(clean, monkeypatch):
    """No connection: which keys become libpq parameters, anchors and merge keys included."""
    from toolkit import gitlab_config

    monkeypatch.delenv("PGSSLCOMPRESSION", raising=False)
    config = clean / "database.yml"
    config.write_text("""\
defaults: &defaults
  adapter: postgresql
  encoding: unicode
  host: db.internal
  port: 5433
  sslmode: verify-full
  sslrootcert: /etc/gitlab/ssl/ca.crt
  sslcompression: 0
  keepalives: true
  connect_timeout: 5
production:
  main:
    <<: *defaults
    database: gitlabhq_production
    username: gitlab
    password: "s3cr3t: with colon"
    prepared_statements: false
    load_balancing: {"hosts": ["replica1"]}
    variables:
      statement_timeout: 15s
  ci:
    <<: *defaults
    database: gitlabhq_production_ci
""")
    found = gitlab_config.read(config)
    url = found.url
    assert (url.host, url.port, url.database, url.username, url.password) == (
        "db.internal", 5433, "gitlabhq_production", "gitlab", "s3cr3t: with colon")
    assert dict(url.query) == {"sslmode": "verify-full", "sslrootcert": "/etc/gitlab/ssl/ca.crt",
                               "keepalives": "1", "connect_timeout": "5"}
    assert found.origin() == f"{config} (production.main)"
