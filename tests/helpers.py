"""Running the CLI against a test database, in-process (CliRunner) or as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner, Result

from toolkit.cli.main import cli
from toolkit.verify.digest import digests

ML_AND_OWN = ("packages_packages", "packages_package_files", "ml_candidates", "ml_experiments",
              "ml_models", "ml_candidate_params", "ml_candidate_metrics")


def toolkit(db, *args: str, env: dict | None = None) -> Result:
    return CliRunner().invoke(cli, ["--database-url", db.url_text, *args], env=env,
                              catch_exceptions=False)


def toolkit_json(db, *args: str) -> tuple[int, dict]:
    result = toolkit(db, "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def toolkit_process(db, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOOLKIT_DATABASE_URL": db.url_text, **(env or {})}
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=full_env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def snapshot(db, tables: tuple[str, ...] = ML_AND_OWN) -> dict:
    with db.engine.connect() as conn:
        return {t: (d.rows, d.digest) for t, d in digests(conn, tables).items()}


def own_schema_exists(db) -> bool:
    return db.scalar("SELECT to_regnamespace('toolkit') IS NOT NULL")
