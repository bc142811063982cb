"""Read everything of some projects with the real MLflow client, as canonical JSON.

Every experiment through ``search_experiments`` (all pages), each one again through
``get_experiment`` and ``get_experiment_by_name``; every run of each through
``search_runs`` (all pages), each one again through ``get_run``; the history of every
metric key of every run. Two reads that should agree and do not, and a run seen twice
while paging, are listed in ``inconsistent``. ``toolkit demo`` and the tests compare the
documents of two stages; the tests run it as ``python -m toolkit.mlflow_api.walk`` in a
process of its own, the client's.

Needs ``mlflow`` (``mlflow-skinny``), which the toolkit itself does not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def client_version() -> str | None:
    try:
        import mlflow
    except ImportError:
        return None
    return mlflow.__version__


def _number(value: float) -> str:
    return repr(float(value))  # nan, inf and -0.0 compare as text


def _experiment(e: Any) -> dict[str, Any]:
    return {"id": e.experiment_id, "name": e.name, "lifecycle_stage": e.lifecycle_stage,
            "tags": dict(sorted(e.tags.items()))}


def _run(r: Any) -> dict[str, Any]:
    i = r.info
    return {"run_id": i.run_id, "experiment_id": i.experiment_id, "run_name": i.run_name,
            "status": i.status, "start_time": i.start_time, "end_time": i.end_time,
            "user_id": i.user_id, "artifact_uri": i.artifact_uri, "lifecycle_stage": i.lifecycle_stage,
            "params": dict(sorted(r.data.params.items())),
            "metrics": {k: _number(v) for k, v in sorted(r.data.metrics.items())},
            "tags": dict(sorted(r.data.tags.items()))}


def _pages(call, **kwargs) -> list[Any]:
    found: list[Any] = []
    token = None
    while True:
        page = call(page_token=token, **kwargs)
        found += list(page)
        token = page.token
        if not token:
            return found


def read_project(tracking_uri: str, page_size: int, *, runs_only: bool = False) -> dict[str, Any]:
    """What the client reads of one project (``runs_only``: experiments and their runs from
    the searches alone, no cross-checks and no metric history)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=tracking_uri)
    inconsistent: list[str] = []
    experiments = [_experiment(e) for e in _pages(client.search_experiments, max_results=page_size,
                                                   view_type=ViewType.ALL)]
    runs: dict[str, dict[str, Any]] = {}
    points = 0
    for experiment in experiments:
        if not runs_only:
            for how, again in (("get_experiment", client.get_experiment(experiment["id"])),
                               ("get_experiment_by_name", client.get_experiment_by_name(experiment["name"]))):
                if again is None or _experiment(again) != experiment:
                    inconsistent.append(f"{how} of experiment {experiment['id']} differs from search")
        for run in _pages(client.search_runs, experiment_ids=[experiment["id"]], max_results=page_size,
                          run_view_type=ViewType.ALL):
            read = _run(run)
            if read["run_id"] in runs:
                inconsistent.append(f"run {read['run_id']} seen twice")
            if not runs_only:
                if _run(client.get_run(read["run_id"])) != read:
                    inconsistent.append(f"get_run of {read['run_id']} differs from search_runs")
                read["history"] = {key: [[_number(m.value), m.timestamp, m.step]
                                         for m in client.get_metric_history(read["run_id"], key)]
                                   for key in read["metrics"]}
                points += sum(len(h) for h in read["history"].values())
            runs[read["run_id"]] = read
    experiments.sort(key=lambda e: int(e["id"]))
    return {"experiments": experiments, "runs": dict(sorted(runs.items())),
            "inconsistent": inconsistent, "metric_points": points}


def read_all(base_url: str, projects: list[int], page_size: int, *,
             runs_only: bool = False) -> dict[str, Any]:
    """Every project's reading (projects read side by side, as several scripts would), and
    the totals."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        readings = pool.map(lambda p: read_project(f"{base_url}/api/v4/projects/{p}/ml/mlflow", page_size,
                                                   runs_only=runs_only), projects)
        read = {str(p): reading for p, reading in zip(projects, readings, strict=True)}
    return {"client": f"mlflow {client_version()}", "projects": read,
            "experiments": sum(len(r["experiments"]) for r in read.values()),
            "runs": sum(len(r["runs"]) for r in read.values()),
            "metric_points": sum(r["metric_points"] for r in read.values()),
            "inconsistent": [f"project {p}: {what}" for p, r in read.items() for what in r["inconsistent"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="http://HOST:PORT of toolkit mlflow serve")
    parser.add_argument("projects", type=int, nargs="+")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--runs-only", action="store_true")
    args = parser.parse_args(argv)
    doc = read_all(args.base_url, args.projects, args.page_size, runs_only=args.runs_only)
    json.dump(doc, sys.stdout, sort_keys=True, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    # Run as a file (by another interpreter, with no toolkit installed), this folder is first
    # on the path: its server.py, views.py must not stand in for modules the client imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.exit(main())
