"""GitLab's own database settings (``database.yml``) as the toolkit's connection.

GitLab Omnibus writes them to ``/var/opt/gitlab/gitlab-rails/etc/database.yml`` (a source
install keeps ``config/database.yml``). The toolkit reads the ``production`` section, as
GitLab's Rails does, in either format:

- several databases (GitLab 15.9 and later): ``production: main: {adapter, host, ...}``,
  and the toolkit takes ``main`` (the database with the ML tables);
- one database (older): ``production: {adapter, host, ...}``.

Keys are read as Rails' PostgreSQL adapter reads them: ``database`` is libpq's ``dbname``,
``username`` its ``user``, and every other key libpq knows (``host``, which may be a socket
directory such as ``/var/opt/gitlab/postgresql``, ``port``, ``password``, ``sslmode``,
``sslrootcert``, ``connect_timeout``, ``keepalives``, ...) is passed on as given; Rails'
own keys (``encoding``, ``load_balancing``, ``prepared_statements``, ``variables``, ...) are
not connection parameters and are left out. Empty values are left out (libpq's defaults).
ERB (``<%= ... %>``), which Rails would evaluate, is refused: the toolkit does not run Ruby.

Anything wrong with the file is a one-line :class:`UsageProblem` naming the file, never
showing a password.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from toolkit.conninfo import from_params, libpq_options
from toolkit.errors import UsageProblem

OMNIBUS_PATH = "/var/opt/gitlab/gitlab-rails/etc/database.yml"
SOURCE_INSTALL_PATH = "config/database.yml"  # in GitLab's directory, e.g. /home/git/gitlab
ENVIRONMENT = "production"
# Rails' names for two of libpq's parameters.
_RENAMED = {"database": "dbname", "username": "user"}
_NEXT = (f"give GitLab's database.yml ({OMNIBUS_PATH} on Omnibus, {SOURCE_INSTALL_PATH} in a "
         "source install), or pass --database-url")


@dataclass(frozen=True)
class GitlabDatabase:
    url: URL
    path: Path
    section: str  # "production.main" or "production"

    def origin(self) -> str:
        return f"{self.path} ({self.section})"


def read(path: str | Path) -> GitlabDatabase:
    """The ``main`` production database of GitLab's ``database.yml`` at ``path``."""
    path = Path(path)
    document = _load(path)
    if not isinstance(document, dict) or not isinstance(document.get(ENVIRONMENT), dict):
        raise UsageProblem(f"{path} has no {ENVIRONMENT} section (a mapping) of database settings", _NEXT)
    production: dict[Any, Any] = document[ENVIRONMENT]
    if isinstance(production.get("main"), dict):
        settings, section = production["main"], f"{ENVIRONMENT}.main"
    elif any(key in production and not isinstance(production[key], dict)
             for key in ("adapter", "database", "host", "username")):
        settings, section = production, ENVIRONMENT
    else:
        raise UsageProblem(f"{path} has no {ENVIRONMENT}.main database (nor a single-database "
                           f"{ENVIRONMENT} section with adapter, host, database)", _NEXT)
    return GitlabDatabase(_url(settings, path, section), path, section)


def _load(path: Path) -> object:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency of the toolkit
        raise UsageProblem("Reading --gitlab-config needs PyYAML, which is not installed",
                           "pip install PyYAML, or pass --database-url") from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageProblem(f"{path} does not exist", _NEXT) from None
    except IsADirectoryError:
        raise UsageProblem(f"{path} is a directory, not GitLab's database.yml", _NEXT) from None
    except PermissionError:
        raise UsageProblem(f"{path} cannot be read by this user (permission denied)",
                           "run as root or as GitLab's user (sudo -u git -H ...), or pass "
                           "--database-url") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageProblem(f"{path} cannot be read: {type(exc).__name__}", _NEXT) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        # The parser's own words may quote the file (and a password in it): only where.
        raise UsageProblem(f"{path} is not valid YAML{where}", _NEXT) from None


def _url(settings: dict[Any, Any], path: Path, section: str) -> URL:
    adapter = settings.get("adapter")
    if adapter is not None and str(adapter) not in ("postgresql", "postgis"):
        raise UsageProblem(f"{path} {section} uses the {str(adapter)!r} adapter: the toolkit works on "
                           "PostgreSQL only", _NEXT)
    known = libpq_options()
    params: dict[str, str] = {}
    names: dict[str, str] = {}
    for key, value in settings.items():
        name = _RENAMED.get(str(key), str(key))
        if name not in known or value is None or isinstance(value, dict | list):
            continue
        text = _text(value)
        if "<%" in text:
            raise UsageProblem(f"{path} {section}.{key} is ERB (<%= ... %>), which Rails evaluates and "
                               "the toolkit cannot", "pass --database-url with the values GitLab uses")
        if text == "":
            continue
        option = known[name]
        if option.compiled is not None and text == option.compiled and not (
                option.envvar and os.environ.get(option.envvar)):
            continue  # libpq's own default: nothing to say (sslcompression: 0, say)
        params[name] = text
        names[name] = f"{section}.{key}"

    def fail(why: str) -> UsageProblem:
        key = why.split("=", 1)[0]
        if key in names:
            why = names[key] + why[len(key):]
        return UsageProblem(f"Cannot use {path}: {why}", f"correct {path}, or pass --database-url")

    return from_params(params, fail)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value).strip()
