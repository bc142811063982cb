"""One training client: a process of the real MLflow client looping as a training script
does, journaling every call (:mod:`toolkit.sandbox.training_journal`).

Each iteration sets an experiment (new names and existing ones, of the awkward kinds
GitLab meets), makes a run with its params, metrics, a batch and tags, ends it, and every
third time registers a model and a version. :class:`toolkit.sandbox.training.Workload`
starts ``N`` of them (``python -m toolkit.sandbox.training worker CONFIG``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.sandbox.training_journal import TRACKING_PATH, Journal

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
