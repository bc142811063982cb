"""``toolkit report``: read-only reports built on the migrated data."""

from __future__ import annotations

import click

from toolkit.cli import params
from toolkit.cli.context import app
from toolkit.output import out
from toolkit.report import candidate_report
from toolkit.words import counted


@click.group()
def report() -> None:
    """Read-only reports over the migrated data.

    Example: toolkit report candidates --project 1 --model pricing-tuned-0 --metric accuracy
    """


@report.command()
@click.option("--project", "project_id", type=params.ID, required=True, help="The project's id.")
@click.option("--model", "model_name", required=True, help="The model's name.")
@click.option("--metric", help="Sort by the latest value of this metric (candidates without it last; a "
                               "metric no candidate has is a warning that lists the model's metrics).")
@click.option("--order", type=click.Choice(["asc", "desc"]), default="desc", show_default=True)
def candidates(project_id: int, model_name: str, metric: str | None, order: str) -> None:
    """A model's candidates with params and latest metrics (read through model_id).

    Example: toolkit report candidates --project 1 --model pricing-tuned-0 --metric loss --order asc
    """
    with app().inspector().read_only() as conn:
        doc = candidate_report(conn, project_id, model_name, metric, order)
    metrics = doc["metric_names"]
    if metric is not None and metric not in metrics:
        # most likely a typo: sorting by a metric no candidate has would change nothing, silently
        known = ", ".join(metrics) if metrics else "none"
        out.warn(f"no candidate of model {doc['model']['name']!r} has a metric {metric!r}, so the "
                 f"candidates are not sorted by it (its metrics: {known})")
    out.say(f"Model {doc['model']['name']} (id {doc['model']['id']}) in project {project_id}: "
            f"{counted(len(doc['candidates']), 'candidate')}")
    out.table(
        ["iid", "eid", "name", "status", "params", *metrics],
        [[c["iid"], c["eid"], c["name"], c["status"],
          "; ".join(f"{k}={v}" for k, v in c["params"].items()),
          *[_number(c["metrics"].get(m)) for m in metrics]] for c in doc["candidates"]],
    )
    app().finish(doc)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
