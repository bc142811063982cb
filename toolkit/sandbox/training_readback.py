"""The training workload's checker: every write the server acknowledged, read back
through the real client, and counted as lost (absent or different) or duplicated (made
twice where the client made it once).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.sandbox.training_journal import CLIENT_ENV, TRACKING_PATH, read_journals, write_latencies


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


@dataclass
class _WrittenRuns:
    """What the journals say was written to runs, acknowledged: the runs made, their
    params and tags, each metric's points in order, and how each ended."""

    runs: dict[str, dict[str, Any]]
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    history: dict[tuple[str, str], list[tuple[float, int, int]]] = field(default_factory=dict)
    ended: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: list[dict[str, Any]]) -> _WrittenRuns:
        written = cls({e["run_id"]: e for e in entries if e.get("op") == "run"},
                      ended={e["run_id"]: e for e in entries if e.get("op") == "ended"})
        for e in entries:
            if not e.get("ok") or "run_id" not in e:
                continue
            if e["op"] in ("log_params", "log_batch"):
                written.params.setdefault(e["run_id"], {}).update(e["params"])
            if e["op"] in ("set_tags", "log_batch"):
                written.tags.setdefault(e["run_id"], {}).update(e["tags"])
            if e["op"] == "log_metric":
                written.history.setdefault((e["run_id"], e["key"]), []).append(
                    (e["value"], e["step"], e["timestamp"]))
            if e["op"] == "log_batch":
                for key, value, timestamp, step in e["metrics"]:
                    written.history.setdefault((e["run_id"], key), []).append((value, step, timestamp))
        return written


def _read_runs(entries, client, report: Report, error) -> None:
    written = _WrittenRuns.of(entries)
    report.runs = len(written.runs)
    report.params = sum(len(p) for p in written.params.values())
    report.tags = sum(len(t) for t in written.tags.values())
    report.metrics = sum(len(h) for h in written.history.values())
    marks: dict[tuple[int, str], Counter] = {}
    for run_id, made in sorted(written.runs.items()):
        project = made["project"]
        try:
            run = client(project).get_run(run_id)
        except error as exc:
            report.lost.append(f"run {run_id} ({made['mark']}): {exc.error_code}")
            continue
        _check_run(client(project), run, made, written, report)
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


def _check_run(client, run, made: dict[str, Any], written: _WrittenRuns, report: Report) -> None:
    """One run read back against what was written to it: what differs is lost, a metric
    point read more often than written duplicated."""
    run_id = made["run_id"]
    said = f"run {run_id} ({made['mark']})"
    if run.info.experiment_id != made["experiment_id"]:
        report.lost.append(f"{said}: experiment {run.info.experiment_id}, "
                           f"written {made['experiment_id']}")
    if made["run_name"] is not None and run.info.run_name != made["run_name"]:
        report.lost.append(f"{said}: run_name {run.info.run_name!r}, written {made['run_name']!r}")
    if run.data.tags.get("training.run") != made["mark"]:
        report.lost.append(f"{said}: tag training.run {run.data.tags.get('training.run')!r}")
    if run.data.params != written.params.get(run_id, {}):
        report.lost.append(f"{said}: params {run.data.params}, written {written.params.get(run_id, {})}")
    for key, value in written.tags.get(run_id, {}).items():
        if run.data.tags.get(key) != value:
            report.lost.append(f"{said}: tag {key} {run.data.tags.get(key)!r}, written {value!r}")
    for (rid, key), points in written.history.items():
        if rid != run_id:
            continue
        latest = run.data.metrics.get(key)
        if latest != points[-1][0]:  # logged in step and time order: the last is the latest
            report.lost.append(f"{said}: latest {key} {latest}, written {points[-1][0]}")
        read = Counter((m.value, m.step, m.timestamp) for m in client.get_metric_history(run_id, key))
        wrote = Counter(points)
        if read - wrote:
            report.duplicated.append(f"{said}: {key} points {sorted(read - wrote)} beyond those written")
        if wrote - read:
            report.lost.append(f"{said}: {key} points {sorted(wrote - read)} not read back")
    end = written.ended.get(run_id)
    if end is not None:
        if run.info.status != end["status"]:
            report.lost.append(f"{said}: status {run.info.status}, written {end['status']}")
        end_time = run.info.end_time
        if end_time is None or not end["after_ms"] - 1000 <= end_time <= end["before_ms"]:
            report.lost.append(f"{said}: end_time {end_time}, written between "
                               f"{end['after_ms']} and {end['before_ms']}")


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
