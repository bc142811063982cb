"""What a writing run says: a line per pass as it ends, the closing lines, and the JSON
document of its result (``migrate``, ``rollback``, ``demo``); and the plan's summary."""

from __future__ import annotations

from typing import Any

from toolkit.cli import render
from toolkit.engine.results import ApplyResult, PassResult, PlanResult
from toolkit.output import out


def seconds(took: float) -> str:
    return f"{took:.2f} s" if took < 10 else f"{took:.1f} s"


def count(n: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{n} {noun if n == 1 else plural}"


def size_range(sizes: list[int]) -> dict[str, int] | None:
    if not sizes:
        return None
    return {"first": sizes[0], "last": sizes[-1], "smallest": min(sizes), "largest": max(sizes)}


def plan_doc(result: PlanResult) -> dict[str, Any]:
    return {"milestone": result.milestone.name, "title": result.milestone.title, "rows": result.rows,
            "gate": result.gate.as_dict(), "steps": [s.as_dict() for s in result.steps]}


def apply_doc(result: ApplyResult) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "milestone": result.milestone.name, "run_id": result.run_id, "complete": result.complete,
        "stopped": result.stopped, "rows": result.rows,
        "seconds": round(result.seconds, 3),
        "timings": {phase: round(took, 3) for phase, took in result.timings.items()},
        "throttled_seconds": result.throttled_seconds,
        "passes": [{"name": p.name, "rows": p.rows, "batches": p.batches, "complete": p.complete,
                    "schema_change": p.schema_change, "changed": p.changed,
                    "finished_before": p.finished_before is not None,
                    "seconds": round(p.seconds, 3), "batch_sizes": size_range(p.batch_sizes),
                    "wal_bytes": p.wal_bytes}
                   for p in result.passes],
    }
    if result.verify is not None:
        doc["verify"] = {"ok": result.verify.ok, "checks": [c.as_dict() for c in result.verify.checks]}
    return doc


def say_pass(p: PassResult, *, undoing: bool = False) -> None:
    """One line for a pass or schema change, said as soon as it ends (the runner's
    ``on_pass``): a run stopped later has shown what it finished."""
    done, nothing_to_do = ("schema change undone", "already undone") if undoing else \
        ("schema changed", "already in place")
    verb = "restored" if undoing else "changed"
    took = f" ({seconds(p.seconds)})"
    if p.finished_before is not None:
        out.say(f"  {p.name}: finished before ({count(p.finished_before, 'row')} {verb}); "
                "not walked again")
    elif p.outcome is not None:
        out.say(f"  {p.name}: {p.outcome if p.changed else 'done before'}{took}")
    elif not p.complete:
        out.say(f"  {p.name}: stopped ({p.stopped}) after {count(p.rows, 'row')} in "
                f"{count(p.batches, 'batch')}{took}")
    elif p.schema_change:
        out.say(f"  {p.name}: {done if p.changed else nothing_to_do}{took}")
    else:
        sizes = size_range(p.batch_sizes)
        spread = (f" of {sizes['smallest']} to {sizes['largest']} keys"
                  if sizes and sizes["smallest"] != sizes["largest"] else "")
        out.say(f"  {p.name}: {count(p.rows, 'row')} {verb} in {count(p.batches, 'batch')}"
                f"{spread}{took}")


def report_apply(result: ApplyResult) -> None:
    """The run's closing lines (each pass has had its own as it ended: ``_say_pass``)."""
    if not result.complete:
        out.say(f"Stopped early ({result.stopped}); run the same command again to continue.")
    if result.throttled_seconds:
        waited = ", ".join(f"{signal.replace('_', ' ')} {seconds(took)}"
                           for signal, took in result.throttled_seconds.items())
        out.say(f"Waited on the database's health: {waited}")
    phases = ", ".join(f"{phase} {seconds(took)}" for phase, took in result.timings.items())
    schema = sum(1 for p in result.passes if p.schema_change and p.changed)
    out.say(f"{result.milestone.name}: {count(result.rows, 'row')} and "
            f"{count(schema, 'schema change')} in {seconds(result.seconds)} ({phases})")
    if result.verify is not None:
        out.say(f"Verify {result.milestone.name}:")
        render.checks(result.verify.checks)


def plan_summary(results: list[PlanResult]) -> dict[str, Any]:
    """The plan's closing numbers. Each row is counted in the one milestone that changes it
    (milestone 3 does not count again the candidates milestone 2 sets), so the total is
    the sum of the milestones' rows."""
    return {"rows": sum(r.rows for r in results),
            "blocking": sum(r.blocking for r in results),
            "warnings": sum(r.warnings for r in results),
            "milestones": [{"milestone": r.milestone.name, "rows": r.rows, "blocking": r.blocking,
                            "warnings": r.warnings, "gate_open": r.gate.ok,
                            "waits_for": None if r.gate.ok else r.gate.previous} for r in results]}


def say_plan_summary(summary: dict[str, Any]) -> None:
    out.say("Summary (each row counted once, in the milestone that changes it):")
    rows = [[m["milestone"], m["rows"], m["blocking"], m["warnings"],
             "open" if m["gate_open"] else f"waits for {m['waits_for'] or 'its preconditions'}"]
            for m in summary["milestones"]]
    if len(rows) > 1:
        rows.append(["total", summary["rows"], summary["blocking"], summary["warnings"], ""])
    out.table(["milestone", "rows", "BLOCKING", "warnings", "gate"], rows)
