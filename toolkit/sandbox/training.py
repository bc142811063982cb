"""A training workload: real MLflow clients writing through ``toolkit mlflow serve
--allow-writes`` while an operator migrates, and a checker that reads every write back.

What an MLflow user of GitLab most needs to know is whether a training job keeps working
while the blueprint runs. So the workload is the real client (``mlflow`` in the venv),
``N`` processes of it, each looping as a training script does: ``set_experiment`` (new
names and existing ones, the awkward kinds GitLab meets: unicode, emoji, spaces, 255
characters, names that slug to nothing, pairs that collide once slugged), ``start_run``
(with a ``run_name`` or without), params, a metric over steps, ``log_batch``, tags, the
end of the run; and every third time a registered model, a version and
``get_latest_versions``.

Each process appends one JSON line per call to its journal (flushed per line, so a
process killed mid-way leaves every acknowledged write it made): ``ok`` when the client
returned without an error (the write is *acknowledged*: it must be read back), else the
error. A 503 the client retries is not an error; each retry the client makes is
journaled with its status (``op: retry``), so the checker can tell the documented 503s
from any other 5xx. Each line carries the call's start (``t``, epoch seconds) and its
latency (``ms``), which ``scripts/bench.py`` splits by milestone.

:func:`read_back` then reads every acknowledged write through the client and counts
what is lost (absent or different) and what is duplicated (a run made twice where the
client made it once, a metric step written twice). Everything the workers choose comes
from ``random.Random`` seeded by the seed and the worker's number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
STATUSES = ("FINISHED", "FAILED", "KILLED")
CYRILLIC = "абвгдежзиклмнопрстуфхцчшщэюя"  # slugs to nothing (GitLab keeps [a-z0-9_.-])


def experiment_name(worker: int, k: int, rng: random.Random, made: list[str],
                    existing: list[str], label: str = "") -> tuple[str, str]:
    """The ``k``-th experiment name of ``worker`` and its kind. New names carry the worker,
    the workload's ``label`` and ``k`` so no two workers (nor two workloads on one database)
    race for one; kinds cycle so each run meets all of them."""
    kind = k % 8
    tag = f"w{worker}{label} {k}"
    if kind == 0:
        return f"train {tag}", "plain"
    if kind == 1:
        return f"🚀 Ünïcödé Straße {tag} 🔥", "unicode"
    if kind == 2:
        return f"  spaced   out {tag}  ", "spaces"
    if kind == 3:
        base = f"long {tag} "
        return base + ("x" if rng.random() < 0.5 else "Ü") * (255 - len(base)), "255 characters"
    if kind == 4:
        number, letters = worker * 100_000 + k, label
        while True:
            number, digit = divmod(number, len(CYRILLIC))
            letters = CYRILLIC[digit] + letters
            if not number:
                break
        return f"Эксперимент {letters} 🧪", "slugs to nothing"
    if kind == 5:
        return f"Twin W{worker}{label} K{k}", "collides once slugged"
    if kind == 6:
        return f"twin_w{worker}{label.lower()}_k{k - 1}", "collides once slugged"  # the previous one's twin
    pool = made if made and (not existing or rng.random() < 0.6) else existing
    if pool:
        return rng.choice(pool), "existing"
    return f"train {tag}", "plain"


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


def _watch_retries(journal: Journal) -> None:
    """Journal every retry the client's urllib3 makes (status or connection error): the
    client hides them, and a 500 it retried would otherwise go unseen."""
    from urllib3.util.retry import Retry

    original = Retry.increment

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        path = (url or "").split("?")[0].split("/api/2.0/")[-1]
        journal.write({"op": "retry", "t": time.time(), "endpoint": path,
                       "status": getattr(response, "status", None),
                       "error": None if error is None else type(error).__name__})
        return original(self, method, url, response, error, _pool, _stacktrace)

    Retry.increment = increment  # type: ignore[method-assign]


def worker_main(config: dict[str, Any]) -> int:
    """One client process: loop until the stop file exists (or ``iterations`` are done)."""
    import mlflow
    from mlflow import MlflowClient

    worker, seed, label = config["worker"], config["seed"], config.get("label", "")
    rng = random.Random(seed * 1000 + worker)
    journal = Journal(Path(config["journal"]))
    _watch_retries(journal)
    stop = Path(config["stop_file"])
    uri = config["server"] + TRACKING_PATH.format(project=config["project"])
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    base = {"worker": worker, "project": config["project"]}

    def call(op: str, fn: Callable[[], Any], **what: Any) -> tuple[bool, Any]:
        started, clock = time.time(), time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # every failure is journaled, none ends the loop
            journal.write({**base, **what, "op": op, "ok": False, "t": started,
                           "ms": round((time.perf_counter() - clock) * 1000, 2),
                           "error": f"{getattr(exc, 'error_code', type(exc).__name__)}: {str(exc)[:300]}"})
            return False, exc
        journal.write({**base, **what, "op": op, "ok": True, "t": started,
                       "ms": round((time.perf_counter() - clock) * 1000, 2)})
        return True, result

    existing: list[str] = []
    ok, found = call("search_experiments", lambda: client.search_experiments(max_results=20))
    if ok:
        # GitLab's search answers deleted experiments too (set_experiment refuses those)
        existing = sorted(e.name for e in found if e.lifecycle_stage == "active"
                          and not e.name.startswith(("train ", "long ")))[:10]
    made: list[str] = []
    models: dict[str, int] = {}  # the models it made, with the versions it made of each
    k = 0
    pause = Path(config["pause_file"])
    while not stop.exists() and (config.get("iterations") is None or k < config["iterations"]):
        if pause.exists():
            _paused(pause, stop, journal, base)
            continue
        name, kind = experiment_name(worker, k, rng, made, existing, config.get("label", ""))
        ok, experiment = call("set_experiment", lambda name=name: _set_experiment(mlflow, name),  # type: ignore[misc]
                              name=name, kind=kind)
        if ok:
            journal.write({**base, "op": "experiment", "name": name, "id": experiment.experiment_id})
            if name not in made and kind != "existing":
                made.append(name)
            _one_run(call, client, mlflow, rng, f"w{worker}{label}-i{k}", experiment.experiment_id, journal,
                     base)
        if k % 3 == 2:
            _registry(call, client, rng, f"w{worker}{label}-{k}", models, journal, base)
        k += 1
        time.sleep(config.get("pause_s", 0.0))
    journal.write({**base, "op": "stopped", "t": time.time(), "iterations": k})
    journal.close()
    return 0


def _set_experiment(mlflow, name: str):
    """``mlflow.set_experiment``, which returns None when the name is neither found nor
    free (get-by-name: none, create: RESOURCE_ALREADY_EXISTS, get-by-name again: none)."""
    experiment = mlflow.set_experiment(name)
    if experiment is None:
        raise RuntimeError(f"set_experiment({name!r}) returned None: the server said the name is taken "
                           "but does not find it by name")
    return experiment


def _paused(pause: Path, stop: Path, journal: Journal, base: dict[str, Any]) -> None:
    """Between iterations (no run of this client open): say so, then wait for the pause
    file to go (or the stop file to come)."""
    try:
        generation = pause.read_text().strip()
    except FileNotFoundError:
        return
    journal.write({**base, "op": "paused", "generation": generation, "t": time.time()})
    while pause.exists() and not stop.exists():
        time.sleep(0.05)


def _one_run(call, client, mlflow, rng: random.Random, mark: str, experiment_id: str,
             journal: Journal, base: dict[str, Any]) -> None:
    run_name = f"run {mark}" if rng.random() < 0.6 else None
    ok, run = call("start_run", lambda: mlflow.start_run(run_name=run_name, tags={"training.run": mark}),
                   experiment_id=experiment_id, run_name=run_name, mark=mark)
    if not ok:
        return
    run_id = run.info.run_id
    journal.write({**base, "op": "run", "run_id": run_id, "experiment_id": experiment_id,
                   "run_name": run_name, "mark": mark})
    params = {f"p{i}": str(rng.randint(0, 10**6)) for i in range(rng.randint(1, 3))}
    call("log_params", lambda: client.log_batch(run_id, params=_params(params)), run_id=run_id, params=params)
    now = int(time.time() * 1000)
    for step in range(rng.randint(2, 5)):
        value = round(rng.uniform(0, 1), 6)
        point = {"key": "loss", "value": value, "timestamp": now + step, "step": step}
        call("log_metric", lambda point=point: client.log_metric(run_id, **point), run_id=run_id, **point)
    metrics = [("acc", round(rng.uniform(0, 1), 6), now + 10 + i, i) for i in range(3)]
    batch_params = {"batch_size": str(rng.choice((16, 32, 64)))}
    batch_tags = {"stage": rng.choice(("dev", "prod"))}
    call("log_batch", lambda: client.log_batch(run_id, metrics=_metrics(metrics),
                                               params=_params(batch_params), tags=_tags(batch_tags)),
         run_id=run_id, metrics=metrics, params=batch_params, tags=batch_tags)
    tags: dict[str, str] = {"team": f"team-{rng.randint(1, 9)}", "note": "δοκιμή ✓"}
    for key, text in tags.items():
        call("set_tags", lambda key=key, text=text: client.set_tag(run_id, key, text),
             run_id=run_id, tags={key: text})
    status = rng.choice(STATUSES)
    before = int(time.time() * 1000)
    ok, _ = call("end_run", lambda: mlflow.end_run(status=status), run_id=run_id, status=status)
    if ok:
        journal.write({**base, "op": "ended", "run_id": run_id, "status": status,
                       "after_ms": before, "before_ms": int(time.time() * 1000)})
    else:  # leave no active run behind for the next start_run
        from mlflow.tracking import fluent
        fluent._active_run_stack.get().clear()
        os.environ.pop("MLFLOW_RUN_ID", None)


def _registry(call, client, rng: random.Random, mark: str, models: dict[str, int], journal: Journal,
              base: dict[str, Any]) -> None:
    if not models or rng.random() < 0.5:
        name = f"reg-{mark}"
        ok, _ = call("create_registered_model", lambda: client.create_registered_model(name), name=name)
        if not ok:
            return
        models[name] = 0
    name = rng.choice(sorted(models))
    source = f"s3://training/{mark}/model"
    ok, version = call("create_model_version", lambda: client.create_model_version(name, source),
                       name=name, source=source)
    if ok:
        # GitLab answers the version's id as ``version`` and its semantic version as its only
        # alias; model-versions/get takes the semantic one (docs/mlflow.md)
        journal.write({**base, "op": "version", "name": name, "version": str(version.version),
                       "semantic": (list(version.aliases or []) or [str(version.version)])[0]})
        models[name] += 1
    if models[name]:  # GitLab answers [null] for a model without versions, which the client cannot parse
        call("get_latest_versions", lambda: client.get_latest_versions(name), name=name)


def _params(params: dict[str, str]) -> list:
    from mlflow.entities import Param
    return [Param(k, v) for k, v in params.items()]


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag
    return [RunTag(k, v) for k, v in tags.items()]


def _metrics(metrics: list) -> list:
    from mlflow.entities import Metric
    return [Metric(key, value, timestamp, step) for key, value, timestamp, step in metrics]


# -- running N of them --------------------------------------------------------------------
@dataclass
class Workload:
    """``clients`` worker processes against ``server`` (http://HOST:PORT), spread over
    ``projects``; ``start()``, then ``stop()`` (a stop file each checks between
    iterations). Journals go to ``folder``."""

    server: str
    projects: list[int]
    clients: int = 2
    seed: int = 1
    folder: Path = None  # type: ignore[assignment]  # a temporary folder when not given
    token: str | None = None
    pause_s: float = 0.05
    iterations: int | None = None
    label: str = ""  # in every name it makes: two workloads on one database make different ones
    env: dict[str, str] = field(default_factory=dict)  # over CLIENT_ENV (e.g. fewer retries)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="toolkit-training-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stop_file = self.folder / "stop"
        self.pause_file = self.folder / "pause"
        self.pauses = 0

    @property
    def journals(self) -> list[Path]:
        return [self.folder / f"client-{i}.jsonl" for i in range(self.clients)]

    def start(self) -> Workload:
        self.stop_file.unlink(missing_ok=True)
        self.pause_file.unlink(missing_ok=True)
        env = {**os.environ, **CLIENT_ENV, "MLFLOW_ENABLE_ASYNC_LOGGING": "false", **self.env}
        env.pop("MLFLOW_TRACKING_URI", None)
        if self.token:
            env["MLFLOW_TRACKING_TOKEN"] = self.token
        for i, journal in enumerate(self.journals):
            config = {"worker": i, "seed": self.seed, "server": self.server, "journal": str(journal),
                      "project": self.projects[i % len(self.projects)], "stop_file": str(self.stop_file),
                      "pause_file": str(self.pause_file),
                      "pause_s": self.pause_s, "iterations": self.iterations, "label": self.label}
            with (self.folder / f"client-{i}.stderr").open("w") as err:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "toolkit.sandbox.training", "worker", json.dumps(config)],
                    env=env, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL))
        return self

    def pause(self, timeout_s: float = 120) -> None:
        """Hold every client between two iterations, no run of theirs open; returns once all
        are held (a fingerprint taken then has no run the clients will still change)."""
        self.pauses += 1
        generation = str(self.pauses)
        written = self.pause_file.with_suffix(".new")
        written.write_text(generation)
        written.replace(self.pause_file)  # whole, never read half-written
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            held = {e["worker"] for e in read_journals(self.journals)
                    if e.get("op") == "paused" and e["generation"] == generation}
            if len(held) == self.clients:
                return
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError("a training client ended while it was asked to pause")
            time.sleep(0.05)
        raise TimeoutError(f"the training clients did not pause within {timeout_s}s")

    def resume(self) -> None:
        self.pause_file.unlink(missing_ok=True)

    def stop(self, timeout_s: float = 180) -> list[int]:
        """Ask every client to stop after its current iteration; their exit codes."""
        self.stop_file.touch()
        return [p.wait(timeout=timeout_s) for p in self.processes]

    def wait(self, timeout_s: float = 300) -> list[int]:
        return [p.wait(timeout=timeout_s) for p in self.processes]

    def calls(self) -> int:
        return sum(1 for entry in read_journals(self.journals) if entry.get("ok") is not None)

    def __enter__(self) -> Workload:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop_file.touch()
        for process in self.processes:
            try:
                process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def first_runs(workload: Workload, timeout_s: float = 90, refused_after: int = 3) -> str | None:
    """Wait until every client has ended a run: None then, else why not (the server refused
    the writes: ``refused_after`` failed set_experiment calls and no experiment set; the
    clients ended; the time ran out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = list(read_journals(workload.journals))
        if len({e["worker"] for e in entries if e.get("op") == "ended"}) == workload.clients:
            return None
        failed = [e for e in entries if e.get("op") == "set_experiment" and e.get("ok") is False]
        if len(failed) >= refused_after and not any(e.get("op") == "experiment" for e in entries):
            return f"the server refused them ({failed[0]['error'][:200]})"
        if all(p.poll() is not None for p in workload.processes):
            return "the clients ended before they wrote"
        time.sleep(0.2)
    return f"the clients wrote no run in {timeout_s:.0f}s"


def read_journals(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.endswith("}"):  # a line cut by a kill is not an acknowledgement
                yield json.loads(line)


# -- reading it back ---------------------------------------------------------------------
@dataclass
class Report:
    experiments: int = 0  # distinct experiments set (new or existing)
    experiments_created: int = 0
    runs: int = 0
    params: int = 0
    metrics: int = 0  # metric points
    tags: int = 0
    models: int = 0
    versions: int = 0
    calls: int = 0
    not_acknowledged: int = 0
    errors: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    retried_503: int = 0
    other_5xx: Counter = field(default_factory=Counter)  # status -> retries the client made
    retried_other: Counter = field(default_factory=Counter)
    write_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.duplicated and not self.other_5xx

    def summary(self) -> str:
        said = (f"{self.experiments_created} experiments, {self.runs} runs, {self.metrics} metrics, "
                f"{self.params} params, {self.tags} tags, {self.models} models, {self.versions} versions "
                f"written")
        back = "all read back" if not self.lost and not self.duplicated else \
            f"{len(self.lost)} lost, {len(self.duplicated)} duplicated"
        extra = f"; {self.retried_503} 503s retried" if self.retried_503 else ""
        if self.other_5xx:
            extra += f"; other 5xx: {dict(self.other_5xx)}"
        if self.not_acknowledged:
            extra += f"; {self.not_acknowledged} calls failed ({top_errors(self.errors)})"
        return f"{said}, {back}{extra}"

    def as_dict(self) -> dict[str, Any]:
        from toolkit.sandbox.app_writer import percentile
        return {"experiments": self.experiments, "experiments_created": self.experiments_created,
                "runs": self.runs, "params": self.params, "metrics": self.metrics, "tags": self.tags,
                "models": self.models, "versions": self.versions, "calls": self.calls,
                "not_acknowledged": self.not_acknowledged, "errors": dict(self.errors),
                "lost": self.lost[:50], "lost_count": len(self.lost),
                "duplicated": self.duplicated[:50], "duplicated_count": len(self.duplicated),
                "retried_503": self.retried_503, "other_5xx": dict(self.other_5xx),
                "write_p50_ms": round(percentile(self.write_ms, 50), 1),
                "write_p99_ms": round(percentile(self.write_ms, 99), 1)}


def top_errors(errors: Counter) -> str:
    return ", ".join(f"{n}× {e[:120]}" for e, n in errors.most_common(3))


@contextmanager
def _client_env(token: str | None) -> Iterator[None]:
    wanted = {**CLIENT_ENV, **({"MLFLOW_TRACKING_TOKEN": token} if token else {})}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_latencies(entries: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, ms) of every acknowledged write call, for splitting by time window."""
    return [(e["t"], e["ms"]) for e in entries if e.get("ok") and e.get("op") in WRITE_OPS]


def read_back(server_url: str, journals: list[Path], *, token: str | None = None) -> Report:
    """Every acknowledged write in ``journals`` read through the real client from
    ``server_url``: what is absent or different is lost, what is there twice duplicated."""
    import warnings

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    warnings.filterwarnings("ignore", message=".*get_latest_versions", category=FutureWarning)
    entries = list(read_journals(journals))
    report = Report()
    for entry in entries:
        if entry.get("op") == "retry":
            status = entry.get("status")
            if status == 503:
                report.retried_503 += 1
            elif status is not None and status >= 500:
                report.other_5xx[status] += 1
            else:
                report.retried_other[str(status or entry.get("error"))] += 1
        elif entry.get("ok") is not None:
            report.calls += 1
            if not entry["ok"]:
                report.not_acknowledged += 1
                report.errors[f"{entry['op']}: {entry['error'].split(':')[0]}"] += 1
                if entry["error"].split(":")[0] in ("INTERNAL_ERROR",) or " 500 " in entry["error"]:
                    report.other_5xx["final"] += 1
    report.write_ms = [ms for _, ms in write_latencies(entries)]

    clients: dict[int, Any] = {}

    def client(project: int):
        if project not in clients:
            clients[project] = MlflowClient(server_url + TRACKING_PATH.format(project=project))
        return clients[project]

    with _client_env(token):
        _read_experiments(entries, client, report, MlflowException)
        _read_runs(entries, client, report, MlflowException)
        _read_registry(entries, client, report, MlflowException)
    return report


def _read_experiments(entries, client, report: Report, error) -> None:
    seen: dict[tuple[int, str], str] = {}
    created: set[tuple[int, str]] = set()
    for e in entries:
        if e.get("op") != "experiment":
            continue
        key = (e["project"], e["name"])
        if key in seen and seen[key] != e["id"]:
            report.duplicated.append(f"experiment {e['name']!r} of project {e['project']}: ids "
                                     f"{seen[key]} and {e['id']}")
        seen.setdefault(key, e["id"])
    kinds: dict[tuple[int, str], str] = {}
    for e in entries:  # its first kind: a name made, then set again, was created
        if e.get("op") == "set_experiment" and e.get("ok"):
            kinds.setdefault((e["project"], e["name"]), e["kind"])
    for (project, name), iid in sorted(seen.items()):
        if kinds.get((project, name)) != "existing":
            created.add((project, name))
        try:
            by_name = client(project).get_experiment_by_name(name)
            by_id = client(project).get_experiment(iid)
        except error as exc:
            report.lost.append(f"experiment {name!r} ({iid}) of project {project}: {exc.error_code}")
            continue
        if by_name is None or by_name.experiment_id != iid:
            report.lost.append(f"experiment {name!r} of project {project}: by name "
                               f"{None if by_name is None else by_name.experiment_id}, written {iid}")
        elif by_id.name != name:
            report.lost.append(f"experiment {iid} of project {project}: named {by_id.name!r}, "
                               f"written {name!r}")
    report.experiments = len(seen)
    report.experiments_created = len(created)


def _read_runs(entries, client, report: Report, error) -> None:
    runs = {e["run_id"]: e for e in entries if e.get("op") == "run"}
    params: dict[str, dict[str, str]] = {}
    tags: dict[str, dict[str, str]] = {}
    history: dict[tuple[str, str], list[tuple[float, int, int]]] = {}
    ended = {e["run_id"]: e for e in entries if e.get("op") == "ended"}
    for e in entries:
        if not e.get("ok") or "run_id" not in e:
            continue
        if e["op"] in ("log_params", "log_batch"):
            params.setdefault(e["run_id"], {}).update(e["params"])
        if e["op"] in ("set_tags", "log_batch"):
            tags.setdefault(e["run_id"], {}).update(e["tags"])
        if e["op"] == "log_metric":
            history.setdefault((e["run_id"], e["key"]), []).append((e["value"], e["step"], e["timestamp"]))
        if e["op"] == "log_batch":
            for key, value, timestamp, step in e["metrics"]:
                history.setdefault((e["run_id"], key), []).append((value, step, timestamp))
    report.runs = len(runs)
    report.params = sum(len(p) for p in params.values())
    report.tags = sum(len(t) for t in tags.values())
    report.metrics = sum(len(h) for h in history.values())
    marks: dict[tuple[int, str], Counter] = {}
    for run_id, made in sorted(runs.items()):
        project = made["project"]
        try:
            run = client(project).get_run(run_id)
        except error as exc:
            report.lost.append(f"run {run_id} ({made['mark']}): {exc.error_code}")
            continue
        said = f"run {run_id} ({made['mark']})"
        if run.info.experiment_id != made["experiment_id"]:
            report.lost.append(f"{said}: experiment {run.info.experiment_id}, "
                               f"written {made['experiment_id']}")
        if made["run_name"] is not None and run.info.run_name != made["run_name"]:
            report.lost.append(f"{said}: run_name {run.info.run_name!r}, written {made['run_name']!r}")
        if run.data.tags.get("training.run") != made["mark"]:
            report.lost.append(f"{said}: tag training.run {run.data.tags.get('training.run')!r}")
        if run.data.params != params.get(run_id, {}):
            report.lost.append(f"{said}: params {run.data.params}, written {params.get(run_id, {})}")
        for key, value in tags.get(run_id, {}).items():
            if run.data.tags.get(key) != value:
                report.lost.append(f"{said}: tag {key} {run.data.tags.get(key)!r}, written {value!r}")
        for (rid, key), points in history.items():
            if rid != run_id:
                continue
            latest = run.data.metrics.get(key)
            if latest != points[-1][0]:  # logged in step and time order: the last is the latest
                report.lost.append(f"{said}: latest {key} {latest}, written {points[-1][0]}")
            read = Counter((m.value, m.step, m.timestamp)
                           for m in client(project).get_metric_history(run_id, key))
            wrote = Counter(points)
            if read - wrote:
                report.duplicated.append(f"{said}: {key} points {sorted(read - wrote)} beyond those written")
            if wrote - read:
                report.lost.append(f"{said}: {key} points {sorted(wrote - read)} not read back")
        end = ended.get(run_id)
        if end is not None:
            if run.info.status != end["status"]:
                report.lost.append(f"{said}: status {run.info.status}, written {end['status']}")
            end_time = run.info.end_time
            if end_time is None or not end["after_ms"] - 1000 <= end_time <= end["before_ms"]:
                report.lost.append(f"{said}: end_time {end_time}, written between "
                                   f"{end['after_ms']} and {end['before_ms']}")
        marks.setdefault((project, made["experiment_id"]), Counter())
    # a run made twice where the client made it once: the same training.run mark twice
    for (project, experiment_id), _ in sorted(marks.items()):
        found: Counter[str] = Counter()
        for run in _all_runs(client(project), experiment_id):
            if mark := run.data.tags.get("training.run"):
                found[mark] += 1
        for mark, n in found.items():
            if n > 1:
                report.duplicated.append(f"run {mark} of experiment {experiment_id} (project {project}): "
                                         f"{n} runs")


def _all_runs(client, experiment_id: str) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _read_registry(entries, client, report: Report, error) -> None:
    models = {(e["project"], e["name"]) for e in entries
              if e.get("op") == "create_registered_model" and e["ok"]}
    versions = [(e["project"], e["name"], e["version"]) for e in entries if e.get("op") == "version"]
    semantic = {(e["project"], e["name"], e["version"]): e.get("semantic", e["version"]) for e in entries
                if e.get("op") == "version"}
    report.models, report.versions = len(models), len(versions)
    for project, name in sorted(models):
        try:
            found = client(project).get_registered_model(name)
            if found.name != name:
                report.lost.append(f"registered model {name!r} of project {project}: read {found.name!r}")
        except error as exc:
            report.lost.append(f"registered model {name!r} of project {project}: {exc.error_code}")
    for project, name, version in versions:
        try:
            asked = semantic[(project, name, version)]
            found = client(project).get_model_version(name, asked)
            if found.name != name or str(found.version) != version:
                report.lost.append(f"version {version} ({asked}) of {name!r}: read {found.name!r} "
                                   f"{found.version}")
        except error as exc:
            report.lost.append(f"version {version} ({asked}) of {name!r} (project {project}): "
                               f"{exc.error_code}")
    # a version made twice where the client made it once: the model's latest version is then
    # not the last one its (only) writer was told about
    last: dict[tuple[int, str], str] = {}
    answered = Counter(versions)
    for (project, name, version), n in sorted(answered.items()):
        if n > 1:
            report.duplicated.append(f"version {version} of {name!r} (project {project}) answered {n} times")
    for project, name, version in versions:
        last[(project, name)] = version
    for (project, name), version in sorted(last.items()):
        try:
            latest = client(project).get_latest_versions(name)
        except error as exc:
            report.lost.append(f"latest versions of {name!r} (project {project}): {exc.error_code}")
            continue
        if [str(v.version) for v in latest] != [version]:
            report.duplicated.append(f"model {name!r} (project {project}): latest versions "
                                     f"{[str(v.version) for v in latest]}, last made {version}")


def main(argv: list[str] | None = None) -> int:
    """``python -m toolkit.sandbox.training run URL --projects 1,2 [--clients N] [--seconds S]``:
    the workload against a server for S seconds, then read back, the report as JSON (exit 1
    when a write was lost or duplicated, or a 5xx other than 503 was seen). ``worker`` is
    how :class:`Workload` starts each client."""
    parser = argparse.ArgumentParser(description="the training workload of toolkit.sandbox.training")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker")
    worker.add_argument("config")
    run = commands.add_parser("run", help="run N clients against a server, then read every write back")
    run.add_argument("server", help="http://HOST:PORT of `toolkit mlflow serve --allow-writes`")
    run.add_argument("--projects", required=True, help="project ids, comma-separated")
    run.add_argument("--clients", type=int, default=2)
    run.add_argument("--seconds", type=float, default=30)
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--label", default="", help="in every name made (a second run on the same database)")
    run.add_argument("--journals", type=Path, default=None,
                     help="folder for the journals (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker_main(json.loads(args.config))
    projects = [int(p) for p in args.projects.split(",")]
    workload = Workload(args.server.rstrip("/"), projects, clients=args.clients, seed=args.seed,
                        folder=args.journals, label=args.label, token=os.environ.get("MLFLOW_TRACKING_TOKEN"))
    with workload:
        time.sleep(args.seconds)
    report = read_back(workload.server, workload.journals, token=workload.token)
    print(json.dumps({"summary": report.summary(), "journals": str(workload.folder), **report.as_dict()},
                     indent=2, ensure_ascii=False))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
