"""``fleet report``: every job's ``job.json`` into one JSON, one JUnit XML, one Markdown.

The jobs' artifacts are all it reads, so it works the same on GitLab CI's downloaded
artifacts, a Kubernetes volume, or a directory a shell loop filled. Given the inventory,
a database with no record (its wave stopped by a failing canary, its job cancelled) is
listed as not run rather than forgotten.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from toolkit.errors import UsageProblem
from toolkit.fleet import record
from toolkit.fleet.inventory import Fleet

JSON_FILE = "fleet-report.json"
JUNIT_FILE = "junit.xml"
MARKDOWN_FILE = "summary.md"


def gather(directory: Path, fleet: Fleet | None = None) -> list[dict[str, Any]]:
    """The newest record of each database under ``directory``, in inventory order."""
    if not directory.is_dir():
        raise UsageProblem(f"{directory} is not a directory of the fleet jobs' artifacts",
                           "pass the directory the jobs wrote with --out (fleet-artifacts in CI)")
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob(record.JOB_FILE)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "database" not in data:
            continue
        kept = found.get(data["database"])
        if kept is None or str(data.get("started_at")) > str(kept.get("started_at")):
            found[data["database"]] = data
    if fleet is None:
        return sorted(found.values(), key=lambda r: (str(r.get("started_at")), r["database"]))
    records: list[dict[str, Any]] = []
    for database in fleet.databases:
        records.append(found.pop(database.name, {}) or {
            "database": database.name, "wave": database.wave, "tags": list(database.tags),
            "status": "not run", "exit_code": None, "seconds": None,
            "error": "no record: the job did not run (an earlier wave failed, or it was cancelled)"})
    return records + list(found.values())  # records of databases the inventory no longer names


def waves(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(r.get("wave") or "-", []).append(r)
    return grouped


def totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in records if r.get("started_at")]
    starts = [datetime.fromisoformat(r["started_at"]) for r in ran]
    ends = [datetime.fromisoformat(r["started_at"]).timestamp() + (r.get("seconds") or 0) for r in ran]
    return {
        "databases": len(records),
        "succeeded": sum(1 for r in records if r.get("status") == "succeeded"),
        "failed": sum(1 for r in records if r.get("status") == "failed"),
        "not_run": sum(1 for r in records if r.get("status") == "not run"),
        "rows": sum(r.get("rows") or 0 for r in records),
        "job_seconds": round(sum(r.get("seconds") or 0 for r in records), 3),
        "wall_seconds": round(max(ends) - min(s.timestamp() for s in starts), 3) if ran else 0,
        "throttled_seconds": round(sum(r.get("throttled_seconds") or 0 for r in records), 3),
    }


def build(records: list[dict[str, Any]]) -> dict[str, Any]:
    grouped = waves(records)
    return {"totals": totals(records), "waves": {w: totals(rs) for w, rs in grouped.items()},
            "databases": records}


def markdown(doc: dict[str, Any]) -> str:
    t = doc["totals"]
    lines = [f"# Fleet report: {t['succeeded']} of {t['databases']} databases succeeded", ""]
    if t["failed"] or t["not_run"]:
        failed = [r["database"] for r in doc["databases"] if r.get("status") == "failed"]
        missing = [r["database"] for r in doc["databases"] if r.get("status") == "not run"]
        lines += [f"- failed: {', '.join(failed) or 'none'}",
                  f"- not run: {', '.join(missing) or 'none'}", ""]
    lines += ["| wave | databases | succeeded | failed | not run | rows | job time (s) | wall time (s) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for wave, w in doc["waves"].items():
        lines.append(f"| {wave} | {w['databases']} | {w['succeeded']} | {w['failed']} | {w['not_run']} | "
                     f"{w['rows']} | {w['job_seconds']:.1f} | {w['wall_seconds']:.1f} |")
    lines += ["", "| database | wave | action | before | after | rows | time (s) | exit | throttled (s) | "
              "verify | error |", "|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in doc["databases"]:
        verify = {True: "ok", False: "FAILED", None: "-"}[r.get("verify_ok")]
        action = f"{r.get('action', '')} {r.get('milestone', '')}".strip() or "-"
        error = (r.get("error") or "").replace("|", "\\|")
        seconds = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        cells = [r["database"], r.get("wave", "-"), action, r.get("state_before") or "-",
                 r.get("state_after") or "-", _dash(r.get("rows")), seconds, _dash(r.get("exit_code")),
                 _dash(r.get("throttled_seconds")), verify, error]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def write(doc: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_FILE, "junit": out_dir / JUNIT_FILE, "markdown": out_dir / MARKDOWN_FILE}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["junit"].write_bytes(record.junit(waves(doc["databases"])))
    paths["markdown"].write_text(markdown(doc))
    return {kind: str(path) for kind, path in paths.items()}
