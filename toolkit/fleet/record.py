"""What one database's job leaves behind (``job.json``), and how it reads as a test case.

A job's record is the summary of the toolkit's own ``--json`` document plus what the
job saw around it (the milestone's state before and after, the wall time): the one shape
``fleet report`` merges, whatever engine ran the job (GitLab CI, a Kubernetes Job, a
shell loop).
"""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree as ET

from toolkit.errors import EXIT_CODE_MEANINGS, ExitCode

# The exit codes after which the same command resumes where the last one stopped: a lock
# or statement timeout (the batch rolled back), throttled, busy (another run held the
# runner; nothing was done), the session ended or a resource ran out. CI retries these and
# only these; every other failure needs a person.
RESUMABLE = (int(ExitCode.LOCKED), int(ExitCode.THROTTLED), int(ExitCode.BUSY), int(ExitCode.SESSION_LOST))
JOB_FILE = "job.json"
REPORT_FILE = "report.json"
LOG_FILE = "log.txt"
EVENTS_FILE = "events.jsonl"  # the run's --events stream, one JSON object a line
JUNIT_FILE = "junit.xml"


def summary(document: dict[str, Any] | None) -> dict[str, Any]:
    """Rows, throttled seconds, verify result and error from a command's JSON document."""
    if not document:
        return {"rows": None, "throttled_seconds": None, "verify_ok": None, "error": None}
    result = document.get("result") or (document.get("error") or {}).get("details", {}) or {}
    if isinstance(result, dict) and "result" in result:
        result = result["result"]
    result = result if isinstance(result, dict) else {}
    verify = result.get("verify")
    checks = result.get("checks")
    if isinstance(verify, dict):
        verify_ok = verify.get("ok")
    elif isinstance(checks, list) and checks:  # a rollback's checks
        verify_ok = all(c.get("ok") for c in checks)
    else:
        verify_ok = None
    throttled = result.get("throttled_seconds")
    error = document.get("error")
    return {
        "rows": result.get("rows"),
        "throttled_seconds": round(sum(throttled.values()), 3) if isinstance(throttled, dict) else None,
        "verify_ok": verify_ok,
        "error": _one_line(error) if isinstance(error, dict) else None,
    }


def _one_line(error: dict[str, Any]) -> str:
    problem = str(error.get("problem") or "").rstrip(".")
    return f"{problem}. Next: {error['next_step']}" if error.get("next_step") else problem


def meaning(code: int | None) -> str:
    try:
        return EXIT_CODE_MEANINGS[ExitCode(code if code is not None else -1)]
    except ValueError:
        return "not one of the toolkit's exit codes (the job's shell or runner ended it)"


def junit(suites: dict[str, list[dict[str, Any]]], name: str = "toolkit fleet") -> bytes:
    """JUnit XML: one suite per wave, one case per database. A database that failed is a
    failure carrying its exit code and error; one whose job never ran (a wave stopped by
    a failing canary) is skipped."""
    root = ET.Element("testsuites", name=name)
    for wave, records in suites.items():
        failures = sum(1 for r in records if r.get("status") == "failed")
        skipped = sum(1 for r in records if r.get("status") == "not run")
        suite = ET.SubElement(root, "testsuite", name=wave, tests=str(len(records)),
                              failures=str(failures), skipped=str(skipped), errors="0",
                              time=f"{sum(r.get('seconds') or 0 for r in records):.3f}")
        for record in records:
            case = ET.SubElement(suite, "testcase", classname=f"fleet.{wave}",
                                 name=f"{record['database']}: {record.get('action', 'migrate')} "
                                      f"{record.get('milestone', '')}".rstrip(),
                                 time=f"{record.get('seconds') or 0:.3f}")
            if record.get("status") == "failed":
                code = record.get("exit_code")
                failure = ET.SubElement(case, "failure", type=f"exit {code}",
                                        message=record.get("error") or meaning(code))
                failure.text = f"exit code {code}: {meaning(code)}\n{record.get('error') or ''}"
            elif record.get("status") == "not run":
                ET.SubElement(case, "skipped", message=record.get("error") or "the job did not run")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
