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
"""

from __future__ import annotations

import re
from urllib.parse import quote

from psycopg import Error as PsycopgError
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL

from toolkit.errors import UsageProblem, redact

DRIVERNAME = "postgresql+psycopg"
EXAMPLE = ("give a URL like postgresql://user@host:5432/gitlabhq_production, several hosts as "
           "postgresql://user@host1:5432,host2:5432/gitlabhq_production?target_session_attrs=read-write, "
           "or a conninfo like 'host=/var/run/postgresql dbname=gitlabhq_production user=gitlab'")
# Parameters whose value is a secret: never shown, wherever the URL is described.
SECRET_PARAMETERS = ("password", "sslpassword")

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
    return _from_params(raw, {k: str(v) for k, v in params.items()})


def _unparsable(raw: str, why: str) -> UsageProblem:
    secrets = tuple(m["pw"].strip("'") for m in (*_URL_PASSWORD.finditer(raw),
                                                  *_PARAM_PASSWORD.finditer(raw)) if m["pw"])
    why = " ".join(why.split()) or "libpq refused it"
    # libpq quotes the token it stumbled on, which may be a piece of the password.
    why = _QUOTED.sub(lambda m: '"***"' if any(m[1] in s for s in secrets) else m[0], why)
    return UsageProblem(
        f"Cannot parse the database URL {redact(raw, secrets)!r}: {redact(why, secrets)}", EXAMPLE)


def _from_params(raw: str, params: dict[str, str]) -> URL:
    username = params.pop("user", None) or None
    password = params.pop("password", None) or None
    database = params.pop("dbname", None) or None
    hosts = params.pop("host").split(",") if "host" in params else []
    ports = params.pop("port").split(",") if "port" in params else []
    for port in ports:
        if port.strip() and not (port.strip().isdigit() and 0 < int(port) < 65536):
            raise _unparsable(raw, f"{port!r} is not a port number")
    if len(ports) > 1 and len(ports) != max(len(hosts), 1):
        raise _unparsable(raw, f"{max(len(hosts), 1)} host(s) but {len(ports)} ports "
                               "(give one port for all hosts, or one per host)")
    if len(hosts) > 1 and len(ports) == 1:
        ports = ports * len(hosts)  # libpq: a single port applies to every host
    for key, value in params.items():
        if key in _CHOICES and value not in _CHOICES[key]:
            raise _unparsable(raw, f"{key}={value!r} is not one of {', '.join(_CHOICES[key])}")
        if key in _INTEGERS and not re.fullmatch(r"\s*-?\d+\s*", value):
            raise _unparsable(raw, f"{key}={value!r} is not a whole number")
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
