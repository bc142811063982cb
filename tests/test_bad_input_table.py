"""The bad-input table: every option of every command, given a value it cannot take.

Each case asserts the same four things: exit code 2 (a usage error), exactly one line on
stderr (``error: … Next: …``) naming what is wrong, no traceback, and nothing written (no
toolkit schema, no ``toolkit.runs`` row, the GitLab tables' row counts unchanged).

Most cases are refused by Click while it reads the options, before anything connects.
That is proven, not assumed: each of them runs first against a database URL nothing
listens on, where any attempt to connect would end in exit 5; then against a real
database, where nothing may change. The few cases only a database can tell
(``--throttle-query``) run against that one database, which the whole table shares.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from toolkit.cli import params
from toolkit.cli.main import cli
from toolkit.errors import ExitCode
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.verify.fingerprint_format import FormatProblem, check

UNREACHABLE = "postgresql://toolkit@127.0.0.1:1/nowhere"  # port 1: connection refused at once
COUNTED = (*ML_TABLE_NAMES, "packages_packages", "packages_package_files")
# No other database may be found by the cases that name none (--gitlab-config's).
NO_DATABASE_ENV = {name: None for name in ("TOOLKIT_DATABASE_URL", "PGHOST", "PGHOSTADDR", "PGPORT",
                                           "PGDATABASE", "PGUSER", "PGSERVICE", "PGSERVICEFILE")}


@dataclass(frozen=True)
class Case:
    """``args`` may name ``{file}`` (written from ``content`` first), ``{dir}`` (a directory
    that exists), ``{regular}`` (a file that exists). ``said``: words the error line holds.
    ``needs_db``: only a database tells (it runs against the real one only).
    ``url``: the case gives the command a database URL (else it names its own source)."""

    args: tuple[str, ...]
    said: str | tuple[str, ...]
    content: str | bytes | Callable[[dict[str, Any]], Any] | None = None
    env: dict[str, str | None] = field(default_factory=dict)
    needs_db: bool = False
    url: bool = True


def case(*args: str, said: str, **kwargs: Any) -> Any:
    shown = said if isinstance(said, str) else said[-1]
    return pytest.param(Case(tuple(args), said, **kwargs), id=f"{' '.join(args)[:60]}: {shown[:40]}")


M1 = ("migrate", "milestone-1")


def numbers() -> list[Any]:
    """Every numeric option of the writing commands (migrate and rollback share them)."""
    bad = [
        ("--batch-size", "99999999999999999999999", "more than 10,000,000"),
        ("--batch-size", "0", "less than 1"),
        ("--batch-size", "-5", "less than 1"),
        ("--batch-size", "1.5", "not a whole number"),
        ("--batch-size", "abc", "not a whole number"),
        ("--batch-size", "10000001", "a batch is one short transaction"),
        ("--batch-size", "1e3", "not a whole number"),
        ("--statement-timeout-ms", "99999999999", "more than 2,147,483,647 ms"),
        ("--statement-timeout-ms", "0", "less than 1"),
        ("--statement-timeout-ms", "2147483648", "PostgreSQL's largest"),
        ("--lock-timeout-ms", "2147483648", "more than 2,147,483,647 ms"),
        ("--lock-timeout-ms", "-1", "less than 1"),
        ("--ddl-lock-timeout-ms", "99999999999", "more than 2,147,483,647 ms"),
        ("--ddl-lock-timeout-ms", "0", "less than 1"),
        ("--target-batch-ms", "2147483648", "more than 2,147,483,647 ms"),
        ("--target-batch-ms", "-1", "less than 0"),
        ("--pause-ms", "99999999999", "more than 2,147,483,647 ms"),
        ("--pause-ms", "-1", "less than 0"),
        ("--max-batches", "0", "less than 1"),
        ("--max-batches", "2147483648", "more than 2,147,483,647"),
        ("--max-runtime", "nan", "not a finite number"),
        ("--max-runtime", "inf", "not a finite number"),
        ("--max-runtime", "-inf", "not a finite number"),
        ("--max-runtime", "1e308", "more than 31,622,400 s"),
        ("--max-runtime", "-1", "less than 0 s"),
        ("--max-runtime", "1e309", "not a finite number"),
        ("--lock-wait", "nan", "not a finite number"),
        ("--lock-wait", "inf", "not a finite number"),
        ("--lock-wait", "-0.5", "less than 0 s"),
        ("--lock-wait", "1e308", "more than 31,622,400 s"),
        ("--lock-wait", "ten", "not a number of seconds"),
        ("--retries", "-1", "less than 0"),
        ("--retries", "10001", "more than 10,000"),
        ("--ddl-retries", "99999999999", "more than 10,000"),
        ("--reconnect", "-1", "less than 0"),
        ("--reconnect", "1e3", "not a whole number"),
        ("--max-replica-lag-ms", "2147483648", "more than 2,147,483,647 ms"),
        ("--max-replica-lag-bytes", "9223372036854775808", "PostgreSQL's bigint"),
        ("--max-replica-lag-bytes", "-1", "less than 0"),
        ("--max-transaction-age-s", "nan", "not a finite number"),
        ("--max-transaction-age-s", "1e308", "more than 31,622,400 s"),
        ("--max-archive-backlog", "-1", "less than 0"),
        ("--max-archive-backlog", "2147483648", "more than 2,147,483,647"),
        ("--max-throttle-s", "inf", "not a finite number"),
        ("--max-throttle-s", "-1", "less than 0 s"),
    ]
    cases = [case(*M1, option, value, said=(f"'{option}'", said)) for option, value, said in bad]
    cases += [case("rollback", "milestone-1", option, value, said=(f"'{option}'", said))
              for option, value, said in (("--batch-size", "0", "less than 1"),
                                          ("--statement-timeout-ms", "99999999999", "2,147,483,647 ms"),
                                          ("--max-runtime", "nan", "not a finite number"),
                                          ("--lock-wait", "inf", "not a finite number"))]
    return cases


def _compare(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], Any]:
    def changed(good: dict[str, Any]) -> Any:
        doc = copy.deepcopy(good)
        change(doc)
        return doc
    return changed


def _first_table(doc: dict[str, Any]) -> str:
    return next(t for t, d in doc["tables"].items() if d is not None)


def _first_keyed(doc: dict[str, Any]) -> str:
    return next(p for p, d in doc["mlflow"].items() if "buckets" in d)


FILES = [
    case("fingerprint", "--out", "{dir}/missing/x.json", said="the directory"),
    case("fingerprint", "--out", "{dir}", said="is a directory"),
    case("fingerprint", "--out", "/proc/version", said="cannot write /proc/version"),
    case("fingerprint", "--out", "{regular}/x.json", said="is not a directory"),
    case("fingerprint", "--out", "", said="is empty"),
    case("fingerprint", "--compare", "{dir}/missing.json", said="does not exist"),
    case("fingerprint", "--compare", "{dir}", said="is a directory"),
    case("fingerprint", "--compare", "{file}", content="not json at all", said="not JSON"),
    case("fingerprint", "--compare", "{file}", content="", said="not JSON"),
    case("fingerprint", "--compare", "{file}", content=b"\xff\xfe{}", said="not UTF-8"),
    case("fingerprint", "--compare", "{file}", content="[1, 2]", said="a list, not a fingerprint"),
    case("fingerprint", "--compare", "{file}", content='{"format": 99}', said="not a toolkit fingerprint"),
    case("fingerprint", "--compare", "{file}", content=_compare(lambda d: d.update(format=True)),
         said="format is True"),
    case("fingerprint", "--compare", "{file}", content=_compare(lambda d: d.update(tables="x")),
         said="tables is a string, not an object"),
    case("fingerprint", "--compare", "{file}",
         content=_compare(lambda d: d["tables"].update({_first_table(d): {"rows": "abc", "hash": None}})),
         said="rows is 'abc'"),
    case("fingerprint", "--compare", "{file}",
         content=_compare(lambda d: d["tables"][_first_table(d)].update(rows=-1)), said="out of range"),
    case("fingerprint", "--compare", "{file}",
         content=_compare(lambda d: d["tables"][_first_table(d)].update(hash=None)), said=".hash is None"),
    case("fingerprint", "--compare", "{file}",
         content=_compare(lambda d: d["tables"][_first_table(d)].pop("hash")), said="has no 'hash'"),
    case("fingerprint", "--compare", "{file}",
         content=_compare(lambda d: d["mlflow"]["runs"].update(rows=float("nan"))), said="mlflow.runs.rows"),
    case("fingerprint", "--compare", "{file}",
         content=_compare(lambda d: d["watermarks"].update(ml_candidates=2**63)), said="watermarks.ml_candidates"),
    case("fingerprint", "--compare", "{file}", content=_compare(lambda d: d.update(extra=1)),
         said="unknown field 'extra'"),
    case("fingerprint", "--compare", "{file}", content=_compare(lambda d: d.pop("tables")),
         said="has no 'tables'"),
    case("fingerprint", "--compare", "{file}",
         content=_compare(lambda d: d["mlflow"][_first_keyed(d)]["buckets"].update(x="00")),
         said="not a bucket number"),
    case("fingerprint", "--compare", "{file}",
         content=_compare(lambda d: d["mlflow"][_first_keyed(d)].update(bucket_size=0)), said="bucket_size"),
    case("fingerprint", "--compare", "{file}", content=_compare(lambda d: d.update(mlflow=[])),
         said="mlflow is a list"),
    case("fingerprint", "--compare", "{file}", content=_compare(lambda d: d.update(scope={"tables": []})),
         said="scope has the fields"),
    case("fingerprint", "--mlflow-only", said="--mlflow-only goes with --compare"),
    case("fingerprint", "--baseline", "milestone-1", "--out", "{dir}/b.json", said="--baseline takes no --out"),
    case("fingerprint", "--baseline", "milestone-9", said="Unknown milestone"),
]

OTHERS = [
    case("--read-timeout", "1e308", "status", said="PostgreSQL's largest statement_timeout"),
    case("--read-timeout", "nan", "plan", said="not a finite number"),
    case("--read-timeout", "inf", "verify", said="not a finite number"),
    case("--read-timeout", "-1", "status", said="less than 0 s"),
    case("--read-timeout", "0.0001", "status", said="less than a millisecond"),
    case("status", "--read-timeout", "abc", said="not a number of seconds"),
    case("--read-timeout", "2147484", "history", said="more than 2,147,483.647 s"),
    case("history", "--limit", "0", said="less than 1"),
    case("history", "--limit", "99999999999", said="more than 2,147,483,647"),
    case("report", "candidates", "--project", "0", "--model", "m", said="less than 1"),
    case("report", "candidates", "--project", "99999999999999999999", "--model", "m", said="bigint"),
    case("report", "candidates", "--project", "abc", "--model", "m", said="not a whole number"),
    case("report", "candidates", "--model", "m", said="Missing option '--project'"),
    case("sandbox", "seed", "--seed", "99999999999999999999", said="bigint"),
    case("sandbox", "seed", "--metrics-per-candidate", "0", said="less than 1"),
    case("sandbox", "seed", "--metrics-per-candidate", "10001", said="more than 10,000"),
    case("sandbox", "seed", "--scale", "huge", said="'--scale'"),
    case("demo", "--batch-size", "0", said="less than 1"),
    case("demo", "--seed", "nan", said="not a whole number"),
    case("mlflow", "serve", "--port", "70000", said="'--port'"),
    case("mlflow", "serve", "--threads", "0", said="'--threads'"),
    case("mlflow", "serve", "--max-body-mb", "2048", said="'--max-body-mb'"),
    case("mlflow", "serve", "--lock-timeout-ms", "0", said="'--lock-timeout-ms'"),
    case("mlflow", "serve", "--lock-timeout-ms", "99999999999", said="more than 2,147,483,647 ms"),
    case("mlflow", "serve", "--statement-timeout-ms", "2147483648", said="PostgreSQL's largest"),
    case("mlflow", "serve", "--idle-timeout-s", "0", said="'--idle-timeout-s'"),
    case("mlflow", "serve", "--packages-dir", "{dir}/missing", said="'--packages-dir'"),
    case("mlflow", "serve", "--max-page-size", "0", said="'--max-page-size'"),
    case(*M1, "--throttle-query", "", said="is empty"),
    case(*M1, "--throttle-query", "   ", said="is empty"),
    case(*M1, "--throttle-flag-file", "{dir}", said="always exists"),
    case(*M1, "--throttle-flag-file", "{dir}/missing/flag", said="cannot ever exist"),
    case(*M1, "--throttle-flag-file", "", said="is empty"),
    case("migrate", said="Missing argument 'MILESTONE'"),
    case("migrate", "milestone-9", said="Unknown milestone 'milestone-9'"),
    case("rollback", "milestone-0", said="Unknown milestone"),
    case("sql", "milestone-9", said="Unknown milestone"),
    case(*M1, "--bogus", said="No such option '--bogus'"),
    case("frobnicate", said="No such command 'frobnicate'"),
    case("plan", "--", "--json", said="Unknown milestone '--json'"),
    case("status", "--database-url", said="requires an argument"),
    case("--database-url", "mysql://root@localhost/db", "status", said="PostgreSQL only"),
    case("--database-url", "", "status", said="The database URL is empty"),
    case("--gitlab-config", "{dir}/missing.yml", "status", said="does not exist", url=False,
         env=NO_DATABASE_ENV),
    case("--gitlab-config", "", "status", said="is a directory", url=False, env=NO_DATABASE_ENV),
    case("--gitlab-config", "{file}", "status", content="production: [unclosed", said="not valid YAML",
         url=False, env=NO_DATABASE_ENV),
    case("status", said="TOOLKIT_READ_TIMEOUT_S='nan'", env={"TOOLKIT_READ_TIMEOUT_S": "nan"}),
    case("status", said="TOOLKIT_READ_TIMEOUT_S='1e308'", env={"TOOLKIT_READ_TIMEOUT_S": "1e308"}),
    case("status", said="not a number of seconds", env={"TOOLKIT_READ_TIMEOUT_S": "ten"}),
    case("status", said="less than a millisecond", env={"TOOLKIT_READ_TIMEOUT_S": "0.0001"}),
]

# Only a database can tell these; each is refused before the run is recorded.
ON_THE_DATABASE = [
    case(*M1, "--throttle-query", "SELECT nonsense FROM nowhere", said="--throttle-query does not run",
         needs_db=True),
    case(*M1, "--throttle-query", "SELEC true", said="--throttle-query does not run", needs_db=True),
    case(*M1, "--throttle-query", "SELECT count(*) FROM pg_stat_activity", said="not true or false",
         needs_db=True),
    case(*M1, "--throttle-query", "SELECT 'yes'", said="not true or false", needs_db=True),
    case(*M1, "--throttle-query", "DELETE FROM ml_models", said="read-only transaction", needs_db=True),
    case(*M1, "--throttle-query", "SELECT now()", said="not true or false", needs_db=True),
    case("rollback", "milestone-1", "--throttle-query", "SELECT 1/0", said="division by zero",
         needs_db=True),
]

CASES = numbers() + FILES + OTHERS + ON_THE_DATABASE


@pytest.fixture(scope="module")
def db(session_database):
    """One database for the whole table, never written (that is what the table asserts)."""
    return session_database("realistic:small")


@pytest.fixture(scope="module")
def good_fingerprint(db, tmp_path_factory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("fp") / "good.json"
    result = _invoke(["--database-url", db.url_text, "fingerprint", "--out", str(path)], {})
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


def counts(db) -> dict[str, Any]:
    """Row counts of the GitLab tables and of the toolkit's run history (and whether its
    schema exists at all): what a bad input must leave as it was."""
    with db.engine.connect() as conn:
        found: dict[str, Any] = dict(conn.execute(sa.text(
            "SELECT " + ", ".join(f"(SELECT count(*) FROM {t}) AS {t}" for t in COUNTED))).one()._mapping)
        found["toolkit schema"] = conn.execute(sa.text("SELECT to_regnamespace('toolkit') IS NOT NULL")).scalar()
        if conn.execute(sa.text("SELECT to_regclass('toolkit.runs') IS NOT NULL")).scalar():
            found["toolkit.runs"] = conn.execute(sa.text("SELECT count(*) FROM toolkit.runs")).scalar()
    return found


def _invoke(args: list[str], env: dict[str, str | None]) -> Result:
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def _words(bad: Case, tmp_path: Path, good: dict[str, Any]) -> list[str]:
    regular = tmp_path / "regular.txt"
    regular.write_text("")
    case_file = tmp_path / "case.file"
    if callable(bad.content):
        case_file.write_text(json.dumps(bad.content(good)))
    elif isinstance(bad.content, bytes):
        case_file.write_bytes(bad.content)
    elif bad.content is not None:
        case_file.write_text(bad.content)
    return [word.format(file=case_file, dir=tmp_path, regular=regular) for word in bad.args]


def _refused(result: Result, bad: Case) -> None:
    # which database (stderr, said by every command that resolved one), then the one error line
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Using ")]
    assert result.exit_code == ExitCode.USAGE, (bad.args, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), (bad.args, result.stderr)
    for words in (bad.said,) if isinstance(bad.said, str) else bad.said:
        assert words in lines[0], (bad.args, words, lines[0])
    assert "Traceback" not in result.output and "Usage:" not in result.output, result.output


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad: Case, db, good_fingerprint, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("TOOLKIT_SANDBOX_DIR", str(tmp_path / "sandbox"))  # never a real one
    words = _words(bad, tmp_path, good_fingerprint)
    before = counts(db)
    if not bad.needs_db:  # refused before connecting: where connecting fails, still exit 2
        _refused(_invoke([*(["--database-url", UNREACHABLE] if bad.url else []), *words], bad.env), bad)
    _refused(_invoke([*(["--database-url", db.url_text] if bad.url else []), *words], bad.env), bad)
    assert counts(db) == before
    assert not before["toolkit schema"]
    leftovers = {p.name for p in tmp_path.iterdir()} - {"regular.txt", "case.file", "sandbox"}
    assert not leftovers, leftovers  # --out's check leaves no file behind


def test_the_table_has_at_least_80_distinct_bad_inputs():
    distinct = {(c.values[0].args, str(c.values[0].content), tuple(sorted(c.values[0].env.items())))
                for c in CASES}
    assert len(distinct) == len(CASES) >= 80, len(distinct)


@pytest.mark.parametrize("option", ["--json first", "--json after"])
def test_with_json_a_usage_error_is_one_document_too(db, option):
    words = ["migrate", "milestone-1", "--batch-size", "0"]
    args = ["--json", *words] if option == "--json first" else [*words, "--json"]
    result = _invoke(["--database-url", db.url_text, *args], {})
    doc = json.loads(result.stdout)
    assert result.exit_code == doc["exit_code"] == ExitCode.USAGE and doc["ok"] is False
    assert doc["error"]["kind"] == "UsageProblem" and "'--batch-size'" in doc["error"]["problem"]
    # an error in a global option, read before the subcommand is known
    root = _invoke(["status", "--read-timeout", "nan", "--json"], {})
    assert root.exit_code == ExitCode.USAGE
    assert json.loads(root.stdout)["error"]["problem"].startswith("Invalid value for '--read-timeout'")


def test_a_real_fingerprint_passes_the_format_check_and_compares_equal(db, good_fingerprint, tmp_path):
    """The check refuses what is wrong, not what `fingerprint --out` writes."""
    check(good_fingerprint)
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good_fingerprint))
    result = _invoke(["--database-url", db.url_text, "fingerprint", "--compare", str(path)], {})
    assert result.exit_code == 0, result.output
    with pytest.raises(FormatProblem):
        check({**good_fingerprint, "tables": "x"})


def test_the_shared_types_take_the_bounds_themselves():
    """The edges are accepted: PostgreSQL's largest timeout, 0 for no read timeout, a millisecond."""
    assert params.TIMEOUT_MS.convert("2147483647", None, None) == 2**31 - 1
    assert params.BATCH_SIZE.convert("10000000", None, None) == 10_000_000
    assert params.READ_TIMEOUT_S.convert("0", None, None) == 0
    assert params.READ_TIMEOUT_S.convert("0.001", None, None) == 0.001
    assert params.READ_TIMEOUT_S.convert("2147483.647", None, None) == 2147483.647
    assert params.SEED.convert("-9223372036854775808", None, None) == -(2**63)
    assert params.SECONDS.convert("0.5", None, None) == 0.5


@pytest.mark.parametrize("args", [[], ["archive"], ["mlflow"], ["report"], ["sandbox"]])
def test_a_group_alone_shows_its_help_not_an_error_line(args):
    """Not a bad value: a group without its command gets the help, as Click gives it."""
    result = _invoke(args, {})
    assert result.exit_code == ExitCode.USAGE
    first = result.output.splitlines()[0]
    assert first.startswith("Usage: ") and first.endswith(f"{' '.join(args)} [OPTIONS] COMMAND [ARGS]...".strip())
    assert "error:" not in result.output
