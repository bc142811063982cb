"""How plans, checks and runs look to a person (JSON shapes come from the as_dict methods)."""

from __future__ import annotations

from typing import Any

from toolkit.engine.listing import count_of
from toolkit.engine.results import CHECK, ROWS, Anomaly, Check, PlanResult, UndoPlan
from toolkit.output import out
from toolkit.words import counted

SHOWN_IDS = 12


def ids_preview(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    key = next(iter(rows[0]))
    if "slug" in rows[0]:  # show what each experiment's model will be called
        ids = [f"{r[key]} {_short(r['name'])!r} -> {_short(r['slug'])}" for r in rows[:SHOWN_IDS]]
    else:
        ids = [str(r[key]) for r in rows[:SHOWN_IDS]]
    total = count_of(rows)
    listed = (f"--json lists the first {len(rows)}" if len(rows) < total else "--json lists all")
    shown = min(len(rows), SHOWN_IDS)
    more = f" … and {total - shown} more ({listed})" if total > shown else ""
    return f"{key}s {', '.join(ids)}{more}"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def anomaly(a: Anomaly) -> None:
    if not a.count:
        return
    label = "BLOCKING" if a.blocking else "warning "
    effect = "left untouched" if a.blocking else "goes ahead"
    out.say(f"    {label} {a.title}: {a.count} ({effect}) — {ids_preview(a.rows)}")
    out.say(f"             what to do: {a.resolution}")


def plan(result: PlanResult, *, show_sql: bool = True) -> None:
    m = result.milestone
    out.say(f"{m.name}: {m.title}")
    for step in result.steps:
        out.say(f"  step {step.step}: {step.description}")
        if step.kind == "schema":
            applied = step.context.get("schema change already applied")
            out.say(f"    schema change: {'already applied' if applied else 'pending'}")
        else:
            parts = ", ".join(f"{k} {v}" for k, v in step.breakdown.items())
            out.say(f"    would change {counted(step.rows, 'row')}" + (f" ({parts})" if parts else ""))
            for label, count in step.context.items():
                out.say(f"    {label}: {count}")
        for a in step.anomalies:
            anomaly(a)
        if not any(a.count for a in step.anomalies):
            out.say("    no anomalies")
        if show_sql:
            out.say("    SQL (Alembic revision):" if step.kind == "schema" else
                    "    SQL, per batch (:lo exclusive, :hi inclusive key bounds):")
            for statement in step.sql:
                for line in statement.splitlines():
                    out.say(f"      {line}")
    gate = result.gate
    if gate.previous is None:
        out.say("  gate: open (first milestone)")
    elif gate.ok:
        out.say(f"  gate: open ({gate.previous} verifies)")
    else:
        out.say(f"  gate: CLOSED — {gate.previous} does not verify; migrate would refuse")


def checks(items: list[Check]) -> None:
    for c in items:
        out.say(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        if not c.ok and c.rows:
            out.say(f"         {ids_preview(c.rows)}")
        if not c.ok and c.remedy:
            for remedy in c.remedy.split(" | "):
                out.say(f"         what to do: {remedy}")


def undo_plan(plan: UndoPlan) -> None:
    """``rollback --dry-run``: each pass in the order the rollback runs it, with its counts."""
    m = plan.milestone
    out.say(f"Rolling back {m.name} would do ({m.name} is {plan.state.replace('_', ' ')}; "
            "counted now, read-only):")
    if not plan.passes:
        out.say("  nothing: the toolkit has recorded nothing in this database")
    for p in plan.passes:
        if p.kind == ROWS:
            out.say(f"  {p.name}: {p.description}")
            for label, n in p.breakdown.items() or {"rows": 0}.items():
                out.say(f"    {label}: {n}")
        elif p.kind == CHECK:
            out.say(f"  {p.name}: {'would run' if p.pending else 'done before'} — {p.description}")
        else:
            out.say(f"  {p.name}: {'schema change to undo' if p.pending else 'already undone'}"
                    f" — {p.description}")
