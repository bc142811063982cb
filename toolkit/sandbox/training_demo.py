"""``toolkit demo``'s training clients: the workload of :mod:`toolkit.sandbox.training`,
short, on one project of the sandbox, writing through ``toolkit mlflow serve
--allow-writes`` while the demo migrates and rolls back; then every acknowledged write read
back through the client.

The project the clients write to is left out of the demo's MLflow readings (which must
read the same at every stage): the writes are new rows there, and the round trip's
fingerprint stops at the ids it saw before, so neither check is about them. A server
that refuses writes (or will not start with them) is said, and the demo goes on.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from toolkit.errors import VerificationFailed
from toolkit.sandbox.training import Workload, first_runs
from toolkit.sandbox.training_readback import Report, read_back, top_errors
from toolkit.sandbox.writing_server import writing_server


class TrainingDuringMigration:
    """Start with ``with``; ``started()`` says how it began, ``finish()`` stops the
    clients, reads back and says the result (raises when a write was lost)."""

    def __init__(self, database_url: str, project: int, *, clients: int = 2, seed: int = 1):
        self.database_url, self.project, self.clients, self.seed = database_url, project, clients, seed
        self.stack = ExitStack()
        self.problem: str | None = None
        self.workload: Workload | None = None
        self.report: Report | None = None

    def __enter__(self) -> TrainingDuringMigration:
        folder = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="toolkit-demo-training-")))
        server = self.stack.enter_context(writing_server(self.database_url, folder / "serve.stderr",
                                                         "--no-access-log"))
        if server.address is None:
            self.problem = f"the server would not start with writes ({server.problem})"
            return self
        self.server = server.address
        self.workload = Workload(server.address, [self.project], clients=self.clients, seed=self.seed,
                                 folder=folder / "journals", pause_s=0.05)
        self.stack.enter_context(self.workload)
        self.problem = first_runs(self.workload)
        if self.problem:
            self.workload.stop()
            self.workload = None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def started(self) -> str:
        if self.problem:
            return f"MLflow writes: not exercised: {self.problem}"
        return (f"MLflow writes: {self.clients} training clients (the real MLflow client) write to project "
                f"{self.project} through `toolkit mlflow serve --allow-writes` from here on")

    def hold(self) -> None:
        """Hold the clients between two iterations (no run of theirs open) until release()."""
        if self.workload is not None:
            self.workload.pause()

    def release(self) -> None:
        if self.workload is not None:
            self.workload.resume()

    def finish(self) -> str:
        if self.workload is None:
            return f"MLflow writes: not exercised: {self.problem}"
        self.workload.stop()
        self.report = report = read_back(self.server, self.workload.journals)
        counts = (f"{report.experiments_created} experiments, {report.runs} runs, {report.metrics} metrics "
                  "written during the migration")
        if report.lost or report.duplicated or report.other_5xx:
            raise VerificationFailed(
                f"MLflow writes: {counts}: {len(report.lost)} lost, {len(report.duplicated)} duplicated, "
                f"other 5xx {dict(report.other_5xx)}: "
                + "; ".join((report.lost + report.duplicated)[:3]),
                "report this with the output of `toolkit mlflow serve`")
        retried = f"; {report.retried_503} 503s retried by the client" if report.retried_503 else ""
        failed = (f"; {report.not_acknowledged} calls failed ({top_errors(report.errors)})"
                  if report.not_acknowledged else "")
        return f"MLflow writes: {counts}, all read back{retried}{failed}"

    def as_dict(self) -> dict[str, Any] | None:
        if self.report is None:
            return {"exercised": False, "problem": self.problem}
        return {"exercised": True, **self.report.as_dict()}
