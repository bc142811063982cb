"""Bad input on the write path: each gets a clear message, its exit code, and changes nothing."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import hba_role, own_schema_exists, snapshot, toolkit

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


ROLE_PASSWORD = "tk-role-password"


@pytest.fixture
def role(realistic_db):
    """A login role of this test's own (roles are cluster-wide), dropped afterwards. Its
    password is for servers that ask for one (a container's pg_hba.conf, as the official
    image's); the embedded server trusts local connections."""
    name = f"tk_role_{os.getpid()}"
    realistic_db.execute(f"DROP ROLE IF EXISTS {name}")
    realistic_db.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{ROLE_PASSWORD}'")
    yield name
    realistic_db.execute(f"DROP OWNED BY {name}")
    realistic_db.execute(f"DROP ROLE {name}")


def _as(db, role_name: str) -> str:
    return db.url.set(username=role_name, password=ROLE_PASSWORD).render_as_string(hide_password=False).replace(
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


def test_a_replica_is_refused_and_nothing_is_written(sandbox_dir):
    """A real streaming replica of a seeded primary (both from the embedded server's binaries)."""
    from toolkit.sandbox.database import seed_sandbox
    from toolkit.sandbox.server import SandboxServer, _bin

    small = {"shared_buffers": "128MB"}
    primary, replica = SandboxServer(sandbox_dir / "primary", small), SandboxServer(sandbox_dir / "replica", small)
    try:
        status = primary.start()
        seed_sandbox(status, "small", "realistic", 1)
        replica._prepare_dirs()
        primary._run([str(_bin("pg_basebackup")), "-D", str(replica.pgdata), "-R", "-X", "stream", "-c", "fast",
                      "-h", str(status.socket_dir), "-p", str(status.port), "-U", "postgres"])
        url = replica.start().url()
        for args in (["migrate", "milestone-1"], ["rollback", "milestone-1"]):
            result = _run(url, *args)
            assert result.exit_code == ExitCode.DATABASE, result.output
            assert "read-only replica (in recovery)" in result.output and "primary" in result.output
        assert _run(url, "plan", "milestone-1").exit_code == 0  # reading a replica is fine
        engine = sa.create_engine(status.url())
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT to_regnamespace('toolkit')")).scalar() is None
        engine.dispose()
    finally:
        replica.destroy()
        primary.destroy()


@pytest.fixture
def password_role(realistic_db):
    """A role that must give its password, over the test server's local socket.

    Only possible where the test server's pg_hba.conf is a file on this machine (the
    embedded server; a container or a shared server cannot be reconfigured by a test).
    """
    name = f"tk_pw_{os.getpid()}"
    yield from hba_role(realistic_db, name, (f"local all {name} scram-sha-256",
                                             f"host all {name} 127.0.0.1/32 scram-sha-256"), "right-one")


def test_a_wrong_password_is_one_line_that_never_shows_the_password(realistic_db, password_role):
    before = snapshot(realistic_db)
    good = realistic_db.url.set(username=password_role, password="right-one")
    assert _run(good.render_as_string(hide_password=False), "plan", "milestone-1").exit_code == 0
    bad = realistic_db.url.set(username=password_role, password="s3cret-Wrong")
    for args in (["migrate", "milestone-1"], ["plan"], ["verify"]):
        result = _run(bad.render_as_string(hide_password=False), *args)
        assert result.exit_code == ExitCode.DATABASE, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Authentication failed for postgresql://" in errors[0], result.output
        assert "check the user and password" in errors[0]
        assert "s3cret-Wrong" not in result.output and "Traceback" not in result.output
    assert snapshot(realistic_db) == before
    assert not own_schema_exists(realistic_db)


@pytest.mark.parametrize("value", [
    "'); DROP TABLE ml_candidates; --",
    "Robert'); DELETE FROM ml_models WHERE ('1'='1",
    "$$; SELECT pg_sleep(10); $$",
    "%s %(name)s {0} :lo \\x00",
])
def test_sql_looking_and_maximum_length_values_go_through_as_data(adversarial_db, value, tmp_path):
    """Names are data: written into every name column a milestone reads, at the length
    limit where there is one, they come out of 1 -> 4 -> 1 unchanged."""
    from helpers import resolve_m1_anomalies

    db = adversarial_db
    resolve_m1_anomalies(db)
    long = (value * 300)[:255]
    db.execute("UPDATE ml_experiments SET name = :v WHERE id = (SELECT max(id) FROM ml_experiments "
               "WHERE model_id IS NULL)", v=long)
    db.execute("UPDATE ml_candidates SET name = :v WHERE id = (SELECT min(id) FROM ml_candidates)", v=value)
    db.execute("UPDATE ml_experiment_metadata SET value = :v WHERE id = (SELECT min(id) FROM "
               "ml_experiment_metadata)", v=(value * 1000)[:5000])
    db.execute("UPDATE ml_candidate_params SET value = :v WHERE id = (SELECT min(id) FROM "
               "ml_candidate_params)", v=(value * 100)[:250])
    original = tmp_path / "original.json"
    assert toolkit(db, "fingerprint", "--out", str(original)).exit_code == 0
    for milestone in ("milestone-1", "milestone-2", "milestone-3", "milestone-4"):
        result = toolkit(db, "migrate", milestone, "--yes")
        assert result.exit_code == 0, result.output
    assert db.scalar("SELECT count(*) FROM ml_models WHERE display_name = :v", v=long) == 1
    slug = db.scalar("SELECT name FROM ml_models WHERE display_name = :v", v=long)
    assert slug.isascii() and len(slug) <= 255 and "'" not in slug and ";" not in slug
    for milestone in ("milestone-4", "milestone-3", "milestone-2", "milestone-1"):
        assert toolkit(db, "rollback", milestone).exit_code == 0
    assert toolkit(db, "fingerprint", "--compare", str(original)).exit_code == 0
    assert db.scalar("SELECT count(*) FROM ml_candidates WHERE name = :v", v=value) == 1
