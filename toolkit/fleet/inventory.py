"""The inventory (``fleet.yml``): which databases, how to reach each, in which wave.

The file never holds a password: a database is reached through a source the toolkit
already reads for one database (an environment variable holding a URL, a libpq service,
GitLab's ``database.yml``), so the secret stays where the operator keeps it (CI/CD
variables, ``~/.pgpass``, GitLab's own files). A bad entry is one usage error (exit 2)
naming the database and the field, before anything connects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import UsageProblem

DEFAULT_PATH = "fleet.yml"
DEFAULT_MAX_PARALLEL = 5
# Job names, resource groups and Kubernetes labels are built from it.
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SOURCES = ("url_env", "service", "gitlab_config")
# Fields that would put a secret in the file, and what to write instead.
SECRET_FIELDS = {"url": "url_env", "database_url": "url_env", "password": "url_env or a libpq service",
                 "dsn": "url_env"}
ON_ERROR = ("stop", "continue")
_NEXT = "correct fleet.yml (see docs/fleet.md for its format)"


@dataclass(frozen=True)
class Wave:
    """A group of databases run together; the first wave is the canary.

    ``on_error: stop`` (the canary's default) makes a failing database stop every later
    wave; ``continue`` (the default of the others) lets the rest go on and reports it.
    """

    name: str
    max_parallel: int
    on_error: str


@dataclass(frozen=True)
class Database:
    name: str
    source: str  # one of SOURCES
    value: str  # the variable's name, the service's name, or database.yml's path
    wave: str
    tags: tuple[str, ...] = ()

    def describe_source(self) -> str:
        return {"url_env": f"${self.value}", "service": f"libpq service {self.value}",
                "gitlab_config": f"GitLab's database.yml {self.value}"}[self.source]


@dataclass(frozen=True)
class Fleet:
    path: str
    waves: tuple[Wave, ...]
    databases: tuple[Database, ...] = field(default_factory=tuple)

    def in_wave(self, wave: str) -> list[Database]:
        return [d for d in self.databases if d.wave == wave]

    def get(self, name: str) -> Database:
        for database in self.databases:
            if database.name == name:
                return database
        raise UsageProblem(f"{self.path} has no database {name!r}",
                           f"one of: {', '.join(d.name for d in self.databases)}")

    def wave(self, name: str) -> Wave:
        return next(w for w in self.waves if w.name == name)


class _Problems:
    """Builds the one-line error that names where in the file the problem is."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, where: str, why: str) -> UsageProblem:
        return UsageProblem(f"{self.path}: {where}: {why}", _NEXT)


def load(path: str | Path) -> Fleet:
    """Read and check ``path``; every problem is a :class:`UsageProblem` (exit 2)."""
    import yaml

    text_path = str(path)
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageProblem(f"{text_path} does not exist", "pass --inventory PATH to the fleet's "
                           "inventory (docs/fleet.md)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageProblem(f"{text_path} cannot be read: {type(exc).__name__}", _NEXT) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UsageProblem(f"{text_path} is not valid YAML{where}", _NEXT) from None
    return parse(document, text_path)


def parse(document: Any, path: str = DEFAULT_PATH) -> Fleet:
    fail = _Problems(path)
    if not isinstance(document, dict):
        raise fail("top level", "must be a mapping with a `databases` list")
    unknown = set(document) - {"databases", "waves", "max_parallel"}
    if unknown:
        raise fail("top level", f"unknown field {sorted(unknown)[0]!r} "
                                "(known: databases, waves, max_parallel)")
    default_parallel = _positive(document.get("max_parallel", DEFAULT_MAX_PARALLEL),
                                 fail, "top level", "max_parallel")
    entries = document.get("databases")
    if not isinstance(entries, list) or not entries:
        raise fail("databases", "must be a non-empty list of databases")
    databases = [_database(entry, i, fail) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for database in databases:
        if database.name in seen:
            raise fail(f"database {database.name}", "field name: given twice; names must be unique")
        seen.add(database.name)
    waves = _waves(document.get("waves"), databases, default_parallel, fail)
    order = {w.name: i for i, w in enumerate(waves)}
    return Fleet(path, tuple(waves), tuple(sorted(databases, key=lambda d: order[d.wave])))


def _positive(value: Any, fail: _Problems, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(where, f"field {name}: must be a whole number of at least 1, not {value!r}")
    return value


def _database(entry: Any, index: int, fail: _Problems) -> Database:
    if not isinstance(entry, dict):
        raise fail(f"databases[{index}]", "must be a mapping (name, url_env|service|gitlab_config, wave)")
    name = entry.get("name")
    where = f"database {name}" if isinstance(name, str) and name else f"databases[{index}]"
    if not isinstance(name, str) or not NAME.match(name):
        raise fail(where, f"field name: {name!r} is not a name of lower-case letters, digits and "
                          "dashes (at most 63; it becomes job names and Kubernetes labels)")
    for key, instead in SECRET_FIELDS.items():
        if key in entry:
            raise fail(where, f"field {key}: the inventory never holds a password; use {instead} "
                              "(the name of an environment variable holding the URL)")
    unknown = set(entry) - {"name", "wave", "tags", *SOURCES}
    if unknown:
        raise fail(where, f"unknown field {sorted(unknown)[0]!r} (known: name, "
                          f"{', '.join(SOURCES)}, wave, tags)")
    given = [key for key in SOURCES if key in entry]
    if len(given) != 1:
        raise fail(where, f"field {'/'.join(SOURCES)}: give exactly one connection source, "
                          f"not {len(given)}")
    source = given[0]
    value = entry[source]
    if not isinstance(value, str) or not value.strip():
        raise fail(where, f"field {source}: must be a non-empty string")
    if source == "url_env" and not ENV_NAME.match(value):
        hint = " (that looks like a URL: put it in a variable and name the variable)" if "://" in value \
            or "=" in value else ""
        raise fail(where, f"field url_env: {value!r} is not an environment variable's name{hint}")
    wave = entry.get("wave", "default")
    if not isinstance(wave, str) or not NAME.match(wave):
        raise fail(where, f"field wave: {wave!r} is not a wave name (lower-case letters, digits, dashes)")
    tags = entry.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise fail(where, "field tags: must be a list of strings")
    return Database(name, source, value, wave, tuple(tags))


def _waves(given: Any, databases: list[Database], default_parallel: int, fail: _Problems) -> list[Wave]:
    """The waves in run order: as listed under ``waves``, else as first named by a database."""
    used = list(dict.fromkeys(d.wave for d in databases))
    if given is None:
        given = used
    if not isinstance(given, list) or not given:
        raise fail("waves", "must be a list of wave names or mappings (name, max_parallel, on_error)")
    waves: list[Wave] = []
    for i, item in enumerate(given):
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not NAME.match(item["name"]):
            raise fail(f"waves[{i}]", "field name: must be a wave name (lower-case letters, digits, dashes)")
        where = f"wave {item['name']}"
        unknown = set(item) - {"name", "max_parallel", "on_error"}
        if unknown:
            raise fail(where, f"unknown field {sorted(unknown)[0]!r} (known: name, max_parallel, on_error)")
        on_error = item.get("on_error", "stop" if i == 0 else "continue")
        if on_error not in ON_ERROR:
            raise fail(where, f"field on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}")
        if any(w.name == item["name"] for w in waves):
            raise fail(where, "field name: given twice")
        waves.append(Wave(item["name"], _positive(item.get("max_parallel", default_parallel), fail,
                                                  where, "max_parallel"), on_error))
    names = {w.name for w in waves}
    for database in databases:
        if database.wave not in names:
            raise fail(f"database {database.name}", f"field wave: {database.wave!r} is not one of "
                                                   f"the waves ({', '.join(w.name for w in waves)})")
    return [w for w in waves if w.name in used]
