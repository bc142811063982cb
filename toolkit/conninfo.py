"""libpq's connection strings, every form, as SQLAlchemy URLs, and back for messages.

Operators paste what their tooling gives them: a URL with several hosts from a Patroni or
pg_auto_failover setup (``postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write``),
a keyword/value conninfo (``host=/var/run/postgresql port=5432 dbname=x``), a Unix socket
(``postgresql:///db?host=/path``), ``postgres://``. libpq itself parses them here
(:func:`psycopg.conninfo.conninfo_to_dict`), so the toolkit accepts exactly what ``psql``
accepts; the result is a SQLAlchemy URL that the psycopg dialect turns back into libpq's
parameters unchanged:

- one TCP host: the URL's host and port, as any SQLAlchemy URL;
- several hosts, or a Unix socket directory: libpq's comma lists in the query
  (``?host=h1,h2&port=5432,5433``), which SQLAlchemy's PostgreSQL dialect hands to
  psycopg as ``host="h1,h2", port="5432,5433"`` (psycopg then tries each in turn, and
  honours ``target_session_attrs`` on each);
- every other parameter (``sslmode``, ``target_session_attrs``, ``connect_timeout``,
  ``application_name``, ``options``, ``hostaddr``, ...): the query, as given.

:func:`render` writes a URL back the way libpq reads it, every host shown and the password
(and ``sslpassword``) masked: that is what every message says the toolkit talks to.

:func:`from_libpq_environment` is what libpq itself would connect to with no connection
string at all (PGHOST, PGPORT, PGDATABASE, PGUSER, PGSERVICE and the service file, ...), as
``psql`` does; :func:`from_params` builds a URL from parameters found elsewhere (GitLab's
``database.yml``), each checked as a URL's would be and named by where it came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from urllib.parse import quote

from psycopg import Error as PsycopgError
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL

from toolkit.errors import UsageProblem, redact

DRIVERNAME = "postgresql+psycopg"
EXAMPLE = ("give a URL like postgresql://user@host:5432/gitlabhq_production, several hosts as "
           "postgresql://user@host1:5432,host2:5432/gitlabhq_production?target_session_attrs=read-write, "
           "or a conninfo like 'host=/var/run/postgresql dbname=gitlabhq_production user=gitlab'")
# Parameters whose value is a secret: never shown, wherever the URL is described.
SECRET_PARAMETERS = ("password", "sslpassword", "oauth_client_secret")
# libpq reads its environment only when one of these says where the database is (as the
# toolkit decides whether to use it); the others (PGPASSWORD, PGSSLMODE, ...) refine it.
LIBPQ_LOCATION_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")

# libpq checks these values only when it connects; checked here, a typo is a usage error
# (exit 2) that names the parameter, not a connection failure.
_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "sslnegotiation": ("postgres", "direct"),
}
_INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
             "keepalives_count", "tcp_user_timeout")

_SCHEME = re.compile(r"^\s*(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://")
_URL_PASSWORD = re.compile(r"://[^:/@]*:(?P<pw>[^@/]*)@")
_PARAM_PASSWORD = re.compile(r"\b(?:ssl)?password\s*=\s*(?P<pw>'(?:[^'\\]|\\.)*'|[^\s&]+)", re.I)
_QUOTED = re.compile(r'"([^"]+)"')


def to_url(raw: str) -> URL:
    """The SQLAlchemy URL (psycopg driver) for any connection string libpq accepts.

    Raises :class:`UsageProblem` (one line, password masked) for anything else.
    """
    text = raw.strip()
    if not text:
        raise UsageProblem("The database URL is empty", EXAMPLE)
    if match := _SCHEME.match(text):
        scheme = match["scheme"].lower()
        backend = scheme.split("+", 1)[0]
        if backend not in ("postgresql", "postgres"):
            raise UsageProblem(f"The toolkit works on PostgreSQL only, not {backend!r}",
                               "give a postgresql:// URL of the GitLab database")
        # SQLAlchemy's spelling (postgresql+psycopg://) is libpq's once the driver is dropped.
        text = "postgresql://" + text[match.end():]
    try:
        params = conninfo_to_dict(text)
    except PsycopgError as exc:
        raise _unparsable(raw, str(exc)) from None
    return _from_params({k: str(v) for k, v in params.items()}, lambda why: _unparsable(raw, why))


def _unparsable(raw: str, why: str) -> UsageProblem:
    secrets = tuple(m["pw"].strip("'") for m in (*_URL_PASSWORD.finditer(raw),
                                                  *_PARAM_PASSWORD.finditer(raw)) if m["pw"])
    why = " ".join(why.split()) or "libpq refused it"
    # libpq quotes the token it stumbled on, which may be a piece of the password.
    why = _QUOTED.sub(lambda m: '"***"' if any(m[1] in s for s in secrets) else m[0], why)
    return UsageProblem(
        f"Cannot parse the database URL {redact(raw, secrets)!r}: {redact(why, secrets)}", EXAMPLE)


def problem(key: str, value: str) -> str | None:
    """Why libpq would refuse ``value`` for the parameter ``key`` when it connects, or None.

    Said as ``key='value' is not ...``; callers that know where the value came from (an
    environment variable, a file) name that instead of ``key``.
    """
    if key == "port":
        for port in value.split(","):
            if port.strip() and not (port.strip().isdigit() and 0 < int(port) < 65536):
                return f"{key}={port.strip()!r} is not a port number (1 to 65535)"
    elif key in _CHOICES and value not in _CHOICES[key]:
        return f"{key}={value!r} is not one of {', '.join(_CHOICES[key])}"
    elif key in _INTEGERS and not re.fullmatch(r"\s*-?\d+\s*", value):
        return f"{key}={value!r} is not a whole number"
    return None


def from_params(params: dict[str, str], fail: Callable[[str], Exception]) -> URL:
    """The URL for libpq parameters found outside a connection string (a file, say).

    ``fail(why)`` makes the exception for a value libpq would refuse; ``why`` names the
    parameter (``port='99999' is not a port number ...``).
    """
    return _from_params(dict(params), fail)


def _from_params(params: dict[str, str], fail: Callable[[str], Exception]) -> URL:
    username = params.pop("user", None) or None
    password = params.pop("password", None) or None
    database = params.pop("dbname", None) or None
    hosts = params.pop("host").split(",") if "host" in params else []
    ports = params.pop("port").split(",") if "port" in params else []
    if why := problem("port", ",".join(ports)):
        raise fail(why)
    if len(ports) > 1 and len(ports) != max(len(hosts), 1):
        raise fail(f"{max(len(hosts), 1)} host(s) but {len(ports)} ports "
                   "(give one port for all hosts, or one per host)")
    if len(hosts) > 1 and len(ports) == 1:
        ports = ports * len(hosts)  # libpq: a single port applies to every host
    for key, value in params.items():
        if why := problem(key, value):
            raise fail(why)
    query: dict[str, str] = {}
    host = port = None
    if len(hosts) > 1 or (hosts and _is_socket(hosts[0])):
        query["host"] = ",".join(hosts)
        if any(p.strip() for p in ports):
            query["port"] = ",".join(p.strip() for p in ports)
    else:
        host = hosts[0] if hosts and hosts[0] else None
        port = int(ports[0]) if ports and ports[0].strip() else None
        if port is not None and host is None:
            query["port"] = str(port)  # the default socket directory, on that port
            port = None
    query.update(params)
    return URL.create(DRIVERNAME, username=username, password=password, host=host, port=port,
                      database=database, query=query)


# -- libpq's own environment ------------------------------------------------------------


@dataclass(frozen=True)
class LibpqOption:
    keyword: str
    envvar: str | None
    compiled: str | None


@cache
def libpq_options() -> dict[str, LibpqOption]:
    """Every parameter this libpq knows, with its environment variable and built-in default."""
    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode()

    return {text(o.keyword) or "": LibpqOption(text(o.keyword) or "", text(o.envvar), text(o.compiled))
            for o in pq.Conninfo.get_defaults()}


def environment_variable(key: str) -> str | None:
    """The environment variable libpq reads for the parameter ``key`` (PGSSLMODE for sslmode)."""
    option = libpq_options().get(key)
    return option.envvar if option else None


# Always part of the URL when libpq has a value: where the database is, and who connects.
_LOCATION = ("host", "hostaddr", "port", "dbname", "user")


@dataclass(frozen=True)
class LibpqEnvironment:
    url: URL
    variables: tuple[str, ...]  # the location variables that are set, in LIBPQ_LOCATION_VARIABLES order
    service: str | None  # PGSERVICE, when set

    def origin(self) -> str:
        said = ", ".join(self.variables)
        if self.service:
            said += f"; service {self.service}"
        return f"libpq's environment ({said})"


def from_libpq_environment() -> LibpqEnvironment | None:
    """What libpq connects to given no connection string, when the environment says where.

    None unless one of :data:`LIBPQ_LOCATION_VARIABLES` is set (and not empty). libpq works
    the parameters out itself (``PQconndefaults``: the service file first, then each PG*
    variable, then its built-in defaults), so the result is what ``psql`` would use; the
    URL carries every parameter that is not a built-in default, so messages show it and the
    toolkit's own defaults (application_name, connect_timeout) do not override PGAPPNAME or
    PGCONNECT_TIMEOUT. The password file (PGPASSFILE, ~/.pgpass) is read by libpq when it
    connects, as always. A value libpq would refuse is a :class:`UsageProblem` naming the
    variable (or the service) it came from.
    """
    environ = os.environ
    variables = tuple(name for name in LIBPQ_LOCATION_VARIABLES if environ.get(name))
    if not variables:
        return None
    service = environ.get("PGSERVICE") or None
    params: dict[str, str] = {}
    origins: dict[str, str] = {}
    for option in pq.Conninfo.get_defaults():
        key = option.keyword.decode()
        if option.val is None or option.val == b"":
            continue
        value = option.val.decode()
        envvar = option.envvar.decode() if option.envvar else None
        if envvar and environ.get(envvar) == value:
            origins[key] = envvar
        elif key == "user" or (option.compiled is not None and option.val == option.compiled):
            origins[key] = "libpq's default"
        else:
            origins[key] = f"service {service}" if service else "libpq's default"
        if key == "passfile" or (origins[key] == "libpq's default" and key not in _LOCATION):
            continue  # what libpq uses anyway (PGPASSFILE too, when it connects): said shortly
        params[key] = value
    if "dbname" not in params and "user" in params:
        params["dbname"] = params["user"]  # libpq's rule: the database named after the user

    def fail(why: str) -> Exception:
        key = why.split("=", 1)[0]
        where = origins.get(key, "libpq's environment")
        if where.startswith("PG"):
            why = where + why[len(key):]
            step = f"correct or unset {where} (libpq reads it, as psql does)"
        else:
            why = f"{why} (from {where})"
            step = ("correct the service file (PGSERVICEFILE, or ~/.pg_service.conf)" if service
                    else "correct libpq's environment")
        return UsageProblem(f"Cannot use libpq's environment: {why}", step)

    return LibpqEnvironment(_from_params(params, fail), variables, service)


# -- libpq's complaints about a parameter, when it connects -------------------------------

_PARAMETER_COMPLAINTS = (
    (re.compile(r'invalid "?(?P<key>\w+)"? value: "(?P<value>[^"]*)"'), None),
    (re.compile(r'invalid port number: "(?P<value>[^"]*)"'), "port"),
    (re.compile(r'invalid integer value "(?P<value>[^"]*)" for connection option "(?P<key>\w+)"'), None),
    (re.compile(r'could not parse network address "(?P<value>[^"]*)"'), "hostaddr"),
    (re.compile(r'definition of service "(?P<value>[^"]*)" not found'), "service"),
    (re.compile(r'service file "(?P<value>[^"]*)" not found'), "servicefile"),
    (re.compile(r"bad value for (?P<key>\w+): '(?P<value>[^']*)'"), None),  # psycopg's own check
    (re.compile(r'invalid connection option "(?P<key>\w+)"'), None),
)


def parameter_complaint(message: str) -> tuple[str, str] | None:
    """(parameter, value) when libpq refused a connection parameter's value, else None."""
    for pattern, key in _PARAMETER_COMPLAINTS:
        if match := pattern.search(message):
            found = match.groupdict()
            return key or found["key"], found.get("value") or ""
    return None


def _is_socket(host: str) -> bool:
    return host.startswith("/") or host.startswith("@")  # a directory, or Linux's abstract namespace


def hosts_and_ports(url: URL) -> list[tuple[str, str]]:
    """Each host of the URL with its port ('' where libpq's default applies)."""
    if url.host or "host" not in url.query:
        return [(url.host or "", str(url.port or _query(url, "port")))]
    hosts = _query(url, "host").split(",")
    ports = _query(url, "port").split(",") if _query(url, "port") else [""]
    if len(ports) == 1:
        ports = ports * len(hosts)
    return list(zip(hosts, ports, strict=False))


def _query(url: URL, key: str) -> str:
    value = url.query.get(key, "")
    return ",".join(value) if isinstance(value, tuple) else value


def render(url: URL) -> str:
    """The URL as libpq reads it: every host, the password and any other secret masked."""
    pairs = hosts_and_ports(url)
    query: dict[str, str] = {}
    if any(_is_socket(h) for h, _ in pairs):
        netloc = ""
        query["host"] = ",".join(h for h, _ in pairs)
        if any(p for _, p in pairs):
            query["port"] = ",".join(p for _, p in pairs)
    else:
        netloc = ",".join(_hostspec(h, p) for h, p in pairs)
    for key in url.query:
        if key not in ("host", "port"):
            query[key] = "***" if key in SECRET_PARAMETERS else _query(url, key)
    user = ""
    if url.username:
        user = quote(url.username, safe="") + (":***" if url.password else "") + "@"
    elif url.password:
        user = ":***@"
    path = "/" + quote(url.database, safe="") if url.database else ("/" if query else "")
    rendered = f"postgresql://{user}{netloc}{path}"
    if query:
        rendered += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='/,:@*')}"
                                   for k, v in query.items())
    return rendered


def _hostspec(host: str, port: str) -> str:
    host = f"[{host}]" if ":" in host else quote(host, safe="")
    return f"{host}:{port}" if port else host


def parameter_refused(message: str) -> UsageProblem | None:
    """A connection parameter libpq refused when it tried to connect: a usage error naming it,
    and the environment variable it came from when it came from one (PGSSLMODE, PGPORT, ...)."""
    found = parameter_complaint(message)
    if found is None:
        return None
    key, value = found
    if key == "servicefile":
        return UsageProblem(f"The service file {value!r} does not exist ({message})",
                            "correct or unset PGSERVICEFILE (libpq reads it, as psql does)")
    envvar = environment_variable(key)
    from_env = bool(envvar and value and os.environ.get(envvar) == value)
    if key == "service":
        named = f"service {value!r}" + (f" (from {envvar})" if from_env else "")
        return UsageProblem(
            f"Connection parameter {named} is not defined: {message}",
            f"add a [{value}] section to the service file (PGSERVICEFILE, else ~/.pg_service.conf), "
            + (f"or unset {envvar}" if from_env else "or correct service= in the database URL"))
    said = f"{envvar}={value!r} (libpq's {key})" if from_env else f"{key}={value!r}"
    return UsageProblem(
        f"Connection parameter {said} is not valid: {message}",
        f"correct or unset {envvar} (libpq reads it, as psql does)" if from_env
        else f"correct {key} in the database URL")


def passfile_ignored() -> str:
    """libpq skips a password file others can read (with a warning on stderr): say so."""
    path = os.environ.get("PGPASSFILE") or os.path.expanduser("~/.pgpass")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if mode & 0o077:
        return f". libpq ignores {path}: others can read it; chmod 600 {path}"
    return ""


_OS_USER_REFUSED = re.compile(r'(?P<method>Peer|Ident) authentication failed for user "(?P<user>[^"]*)"')


def os_user_refused(message: str) -> tuple[str, str] | None:
    """(method, role) when the server's peer or ident rule refused the operating-system user."""
    match = _OS_USER_REFUSED.search(message)
    return (match["method"], match["user"]) if match else None


# A connection the server or libpq refused for a reason no retry changes: the operator must.
_REFUSED_FOR_GOOD = ("no password supplied", "authentication failed for user", "no pg_hba.conf entry",
                     "pg_hba.conf rejects connection", "does not exist")


def refused_for_good(message: str) -> bool:
    """True when a failed connection will fail the same way however often it is retried: a
    connection parameter libpq refuses, a password or authentication the server refuses, a
    role or database that does not exist. ``--reconnect`` must not wait those out."""
    return parameter_complaint(message) is not None or any(words in message for words in _REFUSED_FOR_GOOD)
