"""``toolkit fleet``: plan, pipeline, job, report and k8s-job over an inventory of databases."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli import params
from toolkit.cli.context import app, envelope
from toolkit.errors import UsageProblem
from toolkit.fleet import inventory
from toolkit.fleet.plan import DatabasePlan, plan_fleet
from toolkit.output import out

INVENTORY = click.option("--inventory", "-i", "inventory_path", metavar="PATH",
                         default=inventory.DEFAULT_PATH, show_default=True,
                         help="The fleet's inventory (docs/fleet.md).")


def report_files() -> str:
    from toolkit.fleet import report

    return f"{report.JSON_FILE}, {report.JUNIT_FILE} and {report.MARKDOWN_FILE}"


def _load(path: str) -> inventory.Fleet:
    return inventory.load(path)


def _finish(result: dict, code: int) -> None:
    """The command's one JSON document, with its result even when it fails (a fleet's
    partial answer is the answer), and its exit code."""
    if not code:
        app().finish(result)
        return
    out.document(envelope(app().command, False, code, result=result))
    click.get_current_context().exit(code)


CONCURRENCY = params.Whole(1, 256, "more connections than one machine should open")


@click.group()
def fleet() -> None:
    """The milestones on many GitLab databases: an inventory, a plan, a CI pipeline.

    The inventory (fleet.yml) names each database, how to reach it (an environment
    variable holding its URL, a libpq service, or GitLab's database.yml; never a
    password) and its wave (the first is the canary). See docs/fleet.md.

    Example: toolkit fleet plan --inventory fleet.yml
    """
    given = app()
    if given.database_url is not None or given.gitlab_config is not None:
        raise UsageProblem("--database-url and --gitlab-config do not apply to `toolkit fleet`: the "
                           "inventory names each database and how to reach it",
                           "leave them out, or name the database in fleet.yml (docs/fleet.md)")


def _milestone_states(row: DatabasePlan) -> str:
    short = {"not started": "-", "in_progress": "running", "rolled_back": "rolled back",
             "rolling_back": "rolling back"}
    return " ".join(short.get(s, s) for s in row.states.values()) if row.states else ""


def _estimate(row: DatabasePlan) -> str:
    if row.estimate_s is None:
        return "-" if row.error is None else ""
    return f"{row.estimate_s:.0f} s" if row.estimate_s >= 1 or row.estimate_s == 0 else "<1 s"


@fleet.command("plan")
@INVENTORY
@click.option("--concurrency", "-c", type=CONCURRENCY, default=4, show_default=True, metavar="N",
              help="Databases read at the same time (each one connection, one read-only transaction).")
def plan_command(inventory_path: str, concurrency: int) -> None:
    """Every database's milestones, next step, rows to change, anomalies and estimated
    time, in one table. Read-only; several databases at a time.

    A database that cannot be planned (unreachable, not GitLab's, its variable not set) is
    a row with its error and exit code; the command then exits with the first such code.

    Example: toolkit fleet plan --inventory fleet.yml --concurrency 8 --json
    """
    chosen = _load(inventory_path)
    read_timeout = app().read_timeout_s
    rows = plan_fleet(chosen, concurrency,
                      None if read_timeout is None else int(read_timeout * 1000))
    names = " ".join(f"m{i}" for i in range(1, 5))
    out.table(["database", "wave", "gitlab schema", f"states ({names})", "next", "rows to change",
               "anomalies", "estimate", "exit", "error"],
              [[r.database, r.wave, r.gitlab_schema or "-", _milestone_states(r), r.next_milestone or "-",
                "" if r.rows_to_change is None else r.rows_to_change,
                "" if r.anomalies is None else r.anomalies, _estimate(r), r.exit_code, r.error or ""]
               for r in rows])
    failed = [r for r in rows if r.exit_code]
    out.say(f"{len(rows) - len(failed)} of {len(rows)} databases planned"
            + (f"; not planned: {', '.join(r.database for r in failed)}" if failed else ""))
    result = {"inventory": inventory_path, "concurrency": concurrency,
              "databases": [r.as_dict() for r in rows]}
    _finish(result, failed[0].exit_code if failed else 0)


def _action(words: tuple[str, ...], command: str) -> tuple[str, str, tuple[str, ...]]:
    """``[rollback] MILESTONE [-- RUN OPTIONS...]`` as (action, milestone, run options)."""
    from toolkit import milestones

    action = "rollback" if words[:1] == ("rollback",) else "migrate"
    rest = words[1:] if action == "rollback" else words
    if not rest:
        first = milestones.plan().names[0]
        raise UsageProblem("Missing MILESTONE", f"e.g. `toolkit fleet {command} {first}` or "
                                                f"`toolkit fleet {command} rollback {first}`")
    milestones.get(rest[0])  # an unknown milestone is refused here, before anything is written
    # the run options are read as the command will read them: a typo is refused now, not in
    # every job of the pipeline
    from toolkit.cli import migrate as commands

    run = commands.rollback if action == "rollback" else commands.migrate
    run.make_context(f"toolkit {action}", [rest[0], *rest[1:]])
    return action, rest[0], rest[1:]


@fleet.command("pipeline", context_settings={"ignore_unknown_options": True})
@INVENTORY
@click.argument("words", nargs=-1, metavar="[rollback] MILESTONE [-- RUN OPTIONS]")
@click.option("--out", "-o", "out_path", metavar="FILE", default=None,
              help="Write the YAML here (the artifact a trigger job includes); default: stdout.")
@click.option("--toolkit", "toolkit_command", metavar="COMMAND", default="toolkit", show_default=True,
              help="How the jobs run the toolkit (e.g. a venv's bin/toolkit).")
@click.option("--retries", type=params.Whole(0, 2, "GitLab retries a job at most twice"), default=2,
              show_default=True, help="Retries of a job that stopped with a resumable exit code "
                                      "(4, 6, 7, 75); 0 for none.")
@click.option("--image", default=None, help="The jobs' image (default: the runner's).")
@click.option("--tag", "tags", multiple=True, help="A runner tag for every job (repeat for more).")
def pipeline_command(inventory_path: str, words: tuple[str, ...], out_path: str | None,
                     toolkit_command: str, retries: int, image: str | None, tags: tuple[str, ...]) -> None:
    """Write a GitLab CI child pipeline running MILESTONE (or its rollback) on every database.

    One job per database, a stage per wave (the canary's first), each wave cut into
    stages of its max_parallel jobs; resource_group per database; retry only on the
    resumable exit codes; a failing canary stops the later waves; each job's --json
    report, log and JUnit file as artifacts; a last job merging them (`fleet report`).
    Options after `--` are given to each database's migrate/rollback (e.g. --reconnect 3).

    Example: toolkit fleet pipeline milestone-1 --inventory fleet.yml --out fleet-pipeline.yml
    """
    from toolkit.fleet import pipeline

    action, milestone, extra = _action(words, "pipeline")
    chosen = _load(inventory_path)
    doc = pipeline.generate(chosen, action, milestone, toolkit=toolkit_command, inventory_path=inventory_path,
                            extra=extra, retries=retries, image=image, tags=tags)
    said = " ".join(["toolkit fleet pipeline", *(["rollback"] if action == "rollback" else []), milestone,
                     "--inventory", inventory_path])
    text = pipeline.render(doc, f"Generated by `{said}`; do not edit: generate it again.\n"
                                f"Waves: {', '.join(w.name for w in chosen.waves)} "
                                f"({len(chosen.databases)} databases).")
    result = {"jobs": [k for k, v in doc.items() if isinstance(v, dict) and "stage" in v],
              "stages": doc["stages"], "path": out_path}
    if out_path is None and app().json_mode:
        result["yaml"] = text  # one JSON document on stdout, the YAML in it
    elif out_path is None:
        click.echo(text, nl=False)
    else:
        Path(out_path).write_text(text)
        out.say(f"Wrote {out_path}: {len(chosen.databases)} jobs in {len(doc['stages']) - 1} stages, "
                "then the report")
    app().finish(result)


@fleet.command("job", context_settings={"ignore_unknown_options": True})
@INVENTORY
@click.argument("words", nargs=-1, metavar="[rollback] MILESTONE [-- RUN OPTIONS]")
@click.option("--database", "-d", "name", metavar="NAME", default=None,
              help="The database's name in the inventory.")
@click.option("--index", type=params.Whole(0, 100_000, "an inventory that large"), default=None,
              envvar="JOB_COMPLETION_INDEX", show_envvar=True,
              help="The database by its position in the inventory, or in --wave (a Kubernetes "
                   "Indexed Job's pod has it in JOB_COMPLETION_INDEX).")
@click.option("--wave", metavar="NAME", default=None,
              help="Count --index among this wave's databases (one Kubernetes Job per wave).")
@click.option("--out", "out_dir", metavar="DIR", default="fleet-artifacts", show_default=True,
              help="Where the job writes <database>/job.json, report.json, log.txt and junit.xml.")
def job_command(inventory_path: str, words: tuple[str, ...], name: str | None, index: int | None,
                wave: str | None, out_dir: str) -> None:
    """Run MILESTONE (or its rollback) on one database of the inventory, as a CI job does.

    The run is `toolkit --json migrate|rollback MILESTONE` on that database, and its exit
    code is this command's: CI retries 4, 6 and 75 (resumable), and stops on the others.

    Example: toolkit fleet job --database cell-1 milestone-1 -- --reconnect 3
    """
    from toolkit.fleet import job

    action, milestone, extra = _action(words, "job")
    chosen = _load(inventory_path)
    if (name is None) == (index is None):
        raise UsageProblem("Give --database NAME or --index N (one of them)",
                           "see `toolkit fleet job --help`")
    if index is not None:
        members = list(chosen.databases)
        if wave is not None:
            members = chosen.in_wave(wave)
            if not members:
                raise UsageProblem(f"{inventory_path} has no wave {wave!r}",
                                   f"one of: {', '.join(w.name for w in chosen.waves)}")
        if index >= len(members):
            raise UsageProblem(f"--index {index} is past the {len(members)} databases of "
                               f"{'wave ' + wave if wave else 'the inventory'}",
                               "generate the Job again from this inventory (`toolkit fleet k8s-job`)")
        database = members[index]
    else:
        database = chosen.get(name or "")
    done = job.run(database, action, milestone, Path(out_dir), extra)
    out.say(f"{database.name}: {action} {milestone}: {done['status']} (exit {done['exit_code']}) in "
            f"{done['seconds']:.1f} s; {done['state_before'] or '?'} -> {done['state_after'] or '?'}"
            + (f"; {done['error']}" if done["error"] else ""))
    out.say(f"Artifacts: {Path(out_dir) / database.name}/")
    _finish(done, done["exit_code"])


@fleet.command("report")
@click.argument("directory", metavar="DIR")
@click.option("--inventory", "-i", "inventory_path", metavar="PATH", default=None,
              help="The fleet's inventory: its databases without a record are listed as not run.")
@click.option("--out", "-o", "out_dir", metavar="DIR", default="fleet-report", show_default=True,
              help=f"Where to write {report_files()}.")
def report_command(directory: str, inventory_path: str | None, out_dir: str) -> None:
    """Merge the jobs' artifacts (DIR/<database>/job.json) into one JSON, one JUnit XML and
    one Markdown summary: per database its states before and after, rows, time, exit code,
    throttled seconds and verify result; per wave the totals.

    Exits 1 when a database failed or did not run, so the pipeline's last job says so.

    Example: toolkit fleet report fleet-artifacts --inventory fleet.yml
    """
    from toolkit.fleet import report

    chosen = _load(inventory_path) if inventory_path else None
    records = report.gather(Path(directory), chosen)
    if not records:
        raise UsageProblem(f"{directory} holds no job.json",
                           "pass the directory `toolkit fleet job --out` wrote")
    doc = report.build(records)
    written = report.write(doc, Path(out_dir))
    out.say(report.markdown(doc).rstrip())
    out.say(f"Wrote {', '.join(written.values())}")
    totals = doc["totals"]
    result = {**doc, "written": written}
    _finish(result, 1 if totals["failed"] or totals["not_run"] else 0)


@fleet.command("k8s-job", context_settings={"ignore_unknown_options": True})
@INVENTORY
@click.argument("words", nargs=-1, metavar="[rollback] MILESTONE [-- RUN OPTIONS]")
@click.option("--image", required=True, help="An image with the toolkit installed (its `toolkit` on PATH).")
@click.option("--name", default="toolkit-fleet", show_default=True,
              help="Prefix of the Jobs' and ConfigMap's names.")
@click.option("--namespace", default=None, help="The namespace (default: kubectl's).")
@click.option("--urls-secret", default="toolkit-fleet-urls", show_default=True, metavar="SECRET",
              help="A Secret whose keys are the inventory's url_env variables.")
@click.option("--password-secret", default=None, metavar="SECRET:KEY",
              help="PGPASSWORD from this Secret's key: GitLab's chart's global.psql.password.secret and "
                   ".key, for URLs without a password.")
@click.option("--backoff-limit-per-index", type=params.Whole(0, 10, "a database retried more is stuck"),
              default=2, show_default=True, help="Retries of a database after a resumable exit code.")
@click.option("--wave", "waves", multiple=True, metavar="NAME",
              help="Only this wave's Job (repeat for more).")
@click.option("--out", "-o", "out_path", metavar="FILE", default=None, help="Write here; default: stdout.")
def k8s_job_command(inventory_path: str, words: tuple[str, ...], image: str, name: str,
                    namespace: str | None, urls_secret: str, password_secret: str | None,
                    backoff_limit_per_index: int, waves: tuple[str, ...], out_path: str | None) -> None:
    """Write Kubernetes Indexed Jobs running MILESTONE (or its rollback): one Job per wave,
    one index per database, parallelism the wave's max_parallel, backoffLimitPerIndex,
    and a podFailurePolicy that retries the resumable exit codes (4, 6, 7, 75) and fails the
    index on any other. Apply the canary's Job first; `kubectl wait` for it, then the next.

    Example: toolkit fleet k8s-job milestone-1 --image registry.example.com/toolkit:0.1.0 --out fleet-jobs.yml
    """
    from toolkit.fleet import k8s

    action, milestone, extra = _action(words, "k8s-job")
    chosen = _load(inventory_path)
    unknown = [w for w in waves if w not in {x.name for x in chosen.waves}]
    if unknown:
        raise UsageProblem(f"--wave {unknown[0]}: no such wave in {inventory_path}",
                           f"one of: {', '.join(w.name for w in chosen.waves)}")
    secret_key = None
    if password_secret is not None:
        secret, _, key = password_secret.partition(":")
        if not secret or not key:
            raise UsageProblem(f"--password-secret {password_secret!r} is not SECRET:KEY",
                               "e.g. --password-secret gitlab-postgresql-password:postgresql-password")
        secret_key = (secret, key)
    docs = k8s.manifests(chosen, Path(inventory_path).read_text(), action, milestone, image=image, name=name,
                         namespace=namespace, urls_secret=urls_secret or None, password_secret=secret_key,
                         backoff_limit_per_index=backoff_limit_per_index, extra=extra,
                         waves=list(waves) or None)
    text = k8s.render(docs, "Generated by `toolkit fleet k8s-job`; apply the Jobs in order, each after "
                            "the one before completes.")
    result = {"jobs": [d["metadata"]["name"] for d in docs if d["kind"] == "Job"], "path": out_path}
    if out_path is None and app().json_mode:
        result["yaml"] = text
    elif out_path is None:
        click.echo(text, nl=False)
    else:
        Path(out_path).write_text(text)
        out.say(f"Wrote {out_path}: {len(docs) - 1} Jobs and the inventory's ConfigMap")
    app().finish(result)
