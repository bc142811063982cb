"""Benchmark: reading a large experiment through ``toolkit mlflow serve`` against the same
rows read straight from PostgreSQL, in the same run.

    python scripts/bench_mlflow_reads.py                 # 100,000 runs, about half a minute
    python scripts/bench_mlflow_reads.py --runs 20000

Builds a sandbox of its own (``--data-dir``, never the default sandbox) at the small scale,
adds ``--runs`` runs with a metric, a param and a tag each to one experiment, and then,
``--repeat`` times, alternating:

* the **baseline**: the keyset pages of ``runs/search`` (1000 runs, GitLab's order
  ``created_at DESC, id DESC``) read with psycopg, with each page's latest metrics,
  params and tags: what the server's SQL costs with no HTTP, JSON or artifact_uri;
* the **server**: every page of ``runs/search`` over HTTP from a ``toolkit mlflow serve``
  process (waitress, no access log), following ``next_page_token``.

The figure that counts is the server's throughput as a fraction of the baseline's (median
of the runs), with the server's peak memory (VmHWM) before and after the reading; a
``get_run`` rate is given too (a run found by ``eid`` in the project, as GitLab does).
Results go to ``bench-results/mlflow-reads.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from toolkit.db import create_engine
from toolkit.sandbox.server import SandboxServer

PAGE = 1000
PROJECT = 1

ADD_RUNS = """
WITH e AS (SELECT id, project_id FROM ml_experiments WHERE project_id = :p ORDER BY iid LIMIT 1),
     base AS (SELECT COALESCE(max(internal_id), 0) AS iid FROM ml_candidates WHERE project_id = :p),
     made AS (
        INSERT INTO ml_candidates (created_at, updated_at, experiment_id, user_id, start_time, end_time,
                                   status, name, eid, project_id, internal_id)
        SELECT now() - make_interval(secs => g), now(), e.id, NULL, 1000 * g, 1000 * g + 500, 2,
               'bench-' || g, gen_random_uuid(), e.project_id, base.iid + g
        FROM e, base, generate_series(1, :n) g
        RETURNING id, project_id)
, metrics AS (INSERT INTO ml_candidate_metrics (created_at, updated_at, candidate_id, value, step, name,
                                                 tracked_at, project_id)
              SELECT now(), now(), id, random(), 1, 'loss', 1700000000000, project_id FROM made)
, params AS (INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value, project_id)
             SELECT now(), now(), id, 'lr', '0.01', project_id FROM made)
INSERT INTO ml_candidate_metadata (created_at, updated_at, candidate_id, name, value, project_id)
SELECT now(), now(), id, 'team', 'bench', project_id FROM made
"""

PAGE_SQL = """
SELECT c.id, c.eid, c.name, c.status, c.start_time, c.end_time, c.user_id, c.created_at
FROM ml_candidates c WHERE c.experiment_id = :e AND (c.created_at, c.id) < (:t, :i)
ORDER BY c.created_at DESC, c.id DESC LIMIT :n"""
DATA_SQL = """
SELECT * FROM (SELECT DISTINCT ON (m.candidate_id, m.name) 'metrics' AS part, m.candidate_id, m.name,
                      NULL::text AS value, m.value AS number
               FROM ml_candidate_metrics m WHERE m.candidate_id = ANY(:ids)
               ORDER BY m.candidate_id, m.name, m.id DESC) latest
UNION ALL SELECT 'params', candidate_id, name, value, NULL FROM ml_candidate_params
          WHERE candidate_id = ANY(:ids)
UNION ALL SELECT 'tags', candidate_id, name, value, NULL FROM ml_candidate_metadata
          WHERE candidate_id = ANY(:ids)"""


def baseline(engine: sa.Engine, experiment_row: int) -> tuple[float, int]:
    """Every page straight from PostgreSQL: (seconds, runs)."""
    started, seen = time.perf_counter(), 0
    after: tuple[Any, int] = ("infinity", 2**62)
    with engine.connect() as conn:
        while True:
            rows = list(conn.execute(sa.text(PAGE_SQL), {"e": experiment_row, "t": after[0], "i": after[1],
                                                         "n": PAGE}))
            if not rows:
                break
            list(conn.execute(sa.text(DATA_SQL), {"ids": [r.id for r in rows]}))
            seen += len(rows)
            after = (rows[-1].created_at, rows[-1].id)
            conn.rollback()
    return time.perf_counter() - started, seen


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def through_server(address: str, iid: int) -> tuple[float, int]:
    """Every page of runs/search over HTTP: (seconds, runs)."""
    url = f"{address}/api/v4/projects/{PROJECT}/ml/mlflow/api/2.0/mlflow/runs/search"
    started, seen, token = time.perf_counter(), 0, None
    while True:
        body: dict[str, Any] = {"experiment_ids": [str(iid)], "max_results": PAGE}
        if token:
            body["page_token"] = token
        page = post(url, body)
        seen += len(page.get("runs", []))
        token = page.get("next_page_token")
        if not token:
            return time.perf_counter() - started, seen


def vm(pid: int, field: str) -> int:
    """A /proc/PID/status figure in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("bench-results/mlflow-sandbox"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    status = SandboxServer(data_dir).start()
    subprocess.run([sys.executable, "-m", "toolkit", "-q", "sandbox", "--data-dir", str(data_dir), "seed",
                    "--scale", "small"], check=True, stdout=subprocess.DEVNULL)
    url = status.url()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(ADD_RUNS), {"p": PROJECT, "n": args.runs})
        experiment = conn.execute(sa.text("SELECT id, iid FROM ml_experiments WHERE project_id = :p "
                                          "ORDER BY iid LIMIT 1"), {"p": PROJECT}).one()
        eids = [str(e) for e in conn.execute(sa.text(
            "SELECT eid FROM ml_candidates WHERE experiment_id = :e ORDER BY random() LIMIT 200"),
            {"e": experiment.id}).scalars()]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM (ANALYZE)"))

    server = subprocess.Popen([sys.executable, "-m", "toolkit", "--database-url", url, "mlflow", "serve",
                               "--port", "0", "--no-access-log"], stdout=subprocess.PIPE, text=True)
    try:
        address = ""
        for line in server.stdout:
            if line.startswith("Serving "):
                address = line.split(" at ")[1].split()[0]
            if line.startswith("Ctrl-C"):
                break
        idle_mb = vm(server.pid, "VmRSS")
        timings: dict[str, list[float]] = {"baseline": [], "server": []}
        counts: dict[str, int] = {}
        for _ in range(args.repeat):
            for kind in ("baseline", "server"):
                seconds, seen = (baseline(engine, experiment.id) if kind == "baseline"
                                 else through_server(address, experiment.iid))
                timings[kind].append(seconds)
                counts[kind] = seen
                print(f"{kind}: {seen} runs in {seconds:.2f} s", flush=True)
        started = time.perf_counter()
        for eid in eids:
            with urllib.request.urlopen(f"{address}/api/v4/projects/{PROJECT}/ml/mlflow/api/2.0/mlflow/"
                                        f"runs/get?run_id={eid}", timeout=60) as answer:
                answer.read()
        get_run_rate = len(eids) / (time.perf_counter() - started)
        peak_mb = vm(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(timeout=30)
    engine.dispose()
    medians = {kind: statistics.median(values) for kind, values in timings.items()}
    results = {
        "runs": counts, "repeat": args.repeat, "page": PAGE, "seconds": timings,
        "median_seconds": medians,
        "runs_per_second": {kind: counts[kind] / medians[kind] for kind in medians},
        "server_over_baseline_throughput": medians["baseline"] / medians["server"],
        "server_memory_mb": {"idle_rss": idle_mb, "peak_hwm": peak_mb},
        "get_run_per_second": get_run_rate,
    }
    (args.out / "mlflow-reads.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
