"""What the training workload's clients and its checker share: how the client is set up
to call the server (its retries), and the journal each client keeps.

A journal is one JSON line per client call, flushed per line, so a client killed mid-way
leaves every write the server acknowledged to it; the checker
(:mod:`toolkit.sandbox.training_readback`) and ``scripts/bench.py`` read them back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TRACKING_PATH = "/api/v4/projects/{project}/ml/mlflow"


# How the client retries (mlflow/utils/rest_utils.py, http_request: urllib3's Retry over
# every method, status_forcelist 408/429/500/502/503/504, Retry-After respected): a 503
# during a schema change is answered after the server's lock_timeout (1 s) with
# Retry-After, so 10 retries cover about 20 s of schema change; 10 is the client's own
# upper bound (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT). Without a Retry-After (a refused
# connection) the backoff is 1, 2, 4 … s.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "true",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


WRITE_OPS = ("set_experiment", "start_run", "log_params", "log_metric", "log_batch", "set_tags",
             "end_run", "create_registered_model", "create_model_version")


class Journal:
    """One JSON line per client call, flushed per line (a killed process keeps them)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("a", encoding="utf-8")

    def write(self, entry: dict[str, Any]) -> None:
        self.file.write(json.dumps(entry, default=str, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_journals(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.endswith("}"):  # a line cut by a kill is not an acknowledgement
                yield json.loads(line)


def write_latencies(entries: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, ms) of every acknowledged write call, for splitting by time window."""
    return [(e["t"], e["ms"]) for e in entries if e.get("ok") and e.get("op") in WRITE_OPS]
