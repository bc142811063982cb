"""Bad input on the write path: each gets a clear message, its exit code, and changes nothing."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from helpers import own_schema_exists, snapshot, toolkit

from toolkit.cli.main import cli
from toolkit.errors import ExitCode


def test_a_database_without_gitlab_tables_is_refused(empty_db):
    for args in (["plan"], ["migrate", "milestone-1"], ["migrate", "milestone-1", "--dry-run"],
                 ["verify", "milestone-1"], ["rollback", "milestone-1"], ["status"]):
        result = toolkit(empty_db, *args)
        assert result.exit_code == ExitCode.REFUSED, (args, result.output)
        assert "does not look like GitLab's database" in result.output
        assert "Traceback" not in result.output
    assert not own_schema_exists(empty_db)


@pytest.mark.parametrize(("change", "message"), [
    ("ALTER TABLE ml_candidates DROP COLUMN package_id", "ml_candidates.package_id is missing"),
    ("ALTER TABLE packages_packages ALTER COLUMN package_type TYPE integer",
     "packages_packages.package_type is integer, expected smallint"),
])
def test_a_schema_that_differs_is_refused_before_anything_is_written(realistic_db, change, message):
    realistic_db.execute(change)
    before = snapshot(realistic_db, ("packages_packages",))
    result = toolkit(realistic_db, "migrate", "milestone-1")
    assert result.exit_code == ExitCode.REFUSED
    assert "schema differs" in result.output and message in result.output
    assert snapshot(realistic_db, ("packages_packages",)) == before
    assert not own_schema_exists(realistic_db)


@pytest.fixture
def role(realistic_db):
    """A login role of this test's own (roles are cluster-wide), dropped afterwards."""
    name = f"tk_role_{os.getpid()}"
    realistic_db.execute(f"DROP ROLE IF EXISTS {name}")
    realistic_db.execute(f"CREATE ROLE {name} LOGIN")
    yield name
    realistic_db.execute(f"DROP OWNED BY {name}")
    realistic_db.execute(f"DROP ROLE {name}")


def _as(db, role_name: str) -> str:
    return db.url.set(username=role_name).render_as_string(hide_password=False).replace(
        "postgresql+psycopg", "postgresql")


def _run(url: str, *args: str):
    return CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)


def test_a_read_only_role_is_refused_with_the_reason(realistic_db, role):
    realistic_db.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    realistic_db.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
    before = snapshot(realistic_db)
    result = _run(_as(realistic_db, role), "migrate", "milestone-1")
    assert result.exit_code == ExitCode.DATABASE
    assert "read-only" in result.output
    assert snapshot(realistic_db) == before


def test_missing_privileges_are_named_and_plan_still_works_read_only(realistic_db, role):
    realistic_db.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    realistic_db.execute(f"REVOKE CREATE ON DATABASE \"{realistic_db.name}\" FROM PUBLIC")
    before = snapshot(realistic_db)
    url = _as(realistic_db, role)
    result = _run(url, "migrate", "milestone-1")
    assert result.exit_code == ExitCode.DATABASE
    assert "lacks privileges: UPDATE on packages_packages" in result.output
    assert "CREATE on the database" in result.output
    assert _run(url, "plan", "milestone-1").exit_code == 0
    assert snapshot(realistic_db) == before
    assert not own_schema_exists(realistic_db)
