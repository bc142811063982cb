"""``toolkit demo``'s MLflow readings: the sandbox served as ``toolkit mlflow serve`` serves
it (in a thread of the demo), read whole by the real MLflow client in a process of its
own (:mod:`toolkit.mlflow_api.walk`) at each stage; every reading must equal the first."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import sqlalchemy as sa

from toolkit.errors import VerificationFailed
from toolkit.mlflow_api.server import Api, MlflowServer, serve_in_thread
from toolkit.mlflow_api.walk import client_version
from toolkit.words import counted


class ClientReadings:
    def __init__(self, url: str):
        self.url = url
        self.version = client_version()
        self.baseline: dict[str, Any] | None = None
        self.uris: dict[tuple[str, str], str | None] = {}
        self.first_uris: dict[tuple[str, str], str | None] = {}
        self.readings = 0

    def __enter__(self) -> ClientReadings:
        if self.version is None:
            return self
        self.api = Api.connect(self.url)
        self.server = MlflowServer(("127.0.0.1", 0), self.api, access_log=False)
        serve_in_thread(self.server)
        with self.api.transaction() as conn:
            found = conn.execute(sa.text("SELECT id FROM projects ORDER BY id")).scalars()
            self.projects = [str(p) for p in found]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.version is not None:
            self.server.shutdown()
            self.server.server_close()
            self.api.close()

    def _read(self) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "toolkit.mlflow_api.walk",
                               f"http://{self.server.address_text}", *self.projects],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise VerificationFailed(f"The MLflow client could not read the sandbox: "
                                     f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}",
                                     "report this with the output of `toolkit mlflow serve`")
        reading = json.loads(done.stdout)
        if reading["inconsistent"]:
            raise VerificationFailed(f"The MLflow client read two answers that disagree: "
                                     f"{'; '.join(reading['inconsistent'][:3])}", "report this")
        self.readings += 1
        # GitLab's artifact_uri changes on purpose at milestone 1 (a declared difference):
        # kept apart, counted, and not part of "reads the same"
        self.uris = {(p, run_id): run.pop("artifact_uri", None)
                     for p, project in reading["projects"].items() for run_id, run in project["runs"].items()}
        return reading

    def first(self) -> str:
        if self.version is None:
            return ("MLflow client: not installed (pip install mlflow-skinny, or the toolkit's test "
                    "extra), so not read")
        self.baseline = self._read()
        self.first_uris = self.uris
        return (f"MLflow client (mlflow {self.version}) through `toolkit mlflow serve`: "
                f"{self._counts()}")

    def again(self) -> str:
        """Read again; '' without a client, else a few words for the stage's line."""
        if self.baseline is None:
            return ""
        if self._read() != self.baseline:
            raise VerificationFailed("The MLflow client reads something else than before the first milestone",
                                     "compare `toolkit fingerprint --compare` with the first one, and "
                                     "report this")
        changed = sum(1 for key, uri in self.uris.items() if self.first_uris.get(key) != uri)
        uris = f" but {changed} runs' artifact_uri (GitLab's rule, declared)" if changed else ""
        return f"; MLflow client reads the same{uris}"

    def _counts(self) -> str:
        b = self.baseline or {}
        return (f"{counted(b['experiments'], 'experiment')}, {counted(b['runs'], 'run')}, "
                f"{counted(b['metric_points'], 'metric point')}")

    def summary(self) -> str:
        if self.baseline is None:
            return "MLflow client: not installed, not read"
        return (f"MLflow client: {self._counts()}, read identically ({self.readings} readings: before "
                "the first milestone, after each, and after the last rollback)")

    def as_dict(self) -> dict[str, Any] | None:
        if self.baseline is None:
            return None
        return {"client": f"mlflow {self.version}", "readings": self.readings, "identical": True,
                **{k: self.baseline[k] for k in ("experiments", "runs", "metric_points")}}
