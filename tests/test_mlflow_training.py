"""Training scripts keep running while an operator migrates: the "Done when" of the MLflow
writes (issue 27), at the ``small`` scale of the other MLflow tests.

Four client processes of the training workload (``toolkit.sandbox.training``: the real
MLflow client, set_experiment with awkward names, runs, params, metrics over steps,
log_batch, tags, the end of each run, registered models and versions) write through
``toolkit mlflow serve --allow-writes`` on an adversarial copy while ``migrate
milestone-1`` … ``milestone-4`` then ``rollback milestone-4`` … ``milestone-1`` run, each
killed with SIGKILL part-way and run again to resume. Then:

- every write the client acknowledged reads back identically through the client (0 lost,
  0 duplicated), and no call failed;
- no 5xx but 503s (the client's retries are journaled; the server's access log agrees);
- each milestone verifies (its resumed migrate, and ``verify`` again once the clients
  have written more) without a re-baseline;
- each rollback gives back what existed before its milestone: ``fingerprint --compare``
  with the fingerprint taken before the migrate (every ML table and the MLflow view, up
  to the ids it saw) exits 0. That fingerprint is taken with the clients held between two
  iterations, so no run it saw is one the clients will still change (a run they finish
  later is the application's change, not the rollback's); the migrate's own baseline is
  taken with them writing, and its verify must tell their writes from its own;
- experiments the clients created after milestone 3 and after milestone 4 are models
  with their names as display names (``ml_models.display_name``).

``test_writes_while_milestone_4_is_applied`` adds what milestone 4's stage asks for on its
own: runs and model versions made while it is applied, rebuilt with their experiments by
its rollback.

The gitlab-com scale of the same workload runs in ``scripts/bench.py --mlflow-clients 4``
(too slow for the suite on 2 cores).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Database
from helpers import TALLY, toolkit, toolkit_process
from mlflow_serving import adversarial_database, serve_process

from toolkit.engine.batches import FAULT_KILL_AFTER_ACTIONS_ENV, FAULT_KILL_AFTER_BATCHES_ENV
from toolkit.mlflow_api.walk import client_version
from toolkit.sandbox.training import Workload
from toolkit.sandbox.training_journal import read_journals, write_latencies
from toolkit.sandbox.training_readback import read_back

MILESTONES = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")
CLIENTS, SEED = 4, 27
BATCH = ("--batch-size", "5", "--pause-ms", "20")  # a few seconds each: the clients write meanwhile
# SIGKILL after the 2nd batch or the 1st action (a DDL change or a whole pass), whichever
# comes first: part-way through every migrate and rollback of the small scale
KILL = {FAULT_KILL_AFTER_BATCHES_ENV: "2", FAULT_KILL_AFTER_ACTIONS_ENV: "1"}

pytestmark = pytest.mark.skipif(client_version() is None,
                                reason="the MLflow client is not installed: pip install -e '.[test]'")


@pytest.fixture
def db(pg_server, templates) -> Iterator[Database]:
    with adversarial_database(pg_server, templates, "training") as database:
        yield database


def _entries(workload: Workload) -> list[dict]:
    return list(read_journals(workload.journals))


def _wait_for(workload: Workload, what: str, enough, timeout_s: float = 60) -> list[dict]:
    """Poll the journals until ``enough(entries)``; a client that ended or only fails is
    reported with its errors."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = _entries(workload)
        if enough(entries):
            return entries
        ended = [p.returncode for p in workload.processes if p.poll() is not None]
        assert not ended, (what, ended, [p.read_text()[-1500:] for p in workload.folder.glob("*.stderr")])
        time.sleep(0.2)
    errors = [e["error"] for e in _entries(workload) if e.get("ok") is False]
    raise AssertionError(f"the clients did not get to {what} in {timeout_s}s; their errors: {errors[-5:]}")


def _runs_ended(entries: list[dict]) -> int:
    return sum(1 for e in entries if e.get("op") == "ended")


def _more_runs(workload: Workload, n: int, what: str) -> None:
    """Let every client get on: ``n`` more runs ended than now."""
    start = _runs_ended(_entries(workload))
    _wait_for(workload, what, lambda entries: _runs_ended(entries) >= start + n)


def created_since(entries: list[dict], since: float) -> list[tuple[int, str]]:
    """Experiments the clients created (a new name's first set_experiment) after ``since``."""
    first: dict[tuple[int, str], dict] = {}
    for e in entries:
        if e.get("op") == "set_experiment" and e.get("ok"):
            first.setdefault((e["project"], e["name"]), e)
    return sorted(key for key, e in first.items() if e["kind"] != "existing" and e["t"] > since)


class Commands:
    """The milestone commands run, each with its time window (the clients must have written
    during each), also written next to the journals (which command ran when a call failed)."""

    def __init__(self, log: Path):
        self.log = log
        self.windows: dict[str, tuple[float, float]] = {}

    def ran(self, what: str, began: float, code: int, output: str) -> None:
        ended = time.time()
        self.windows[what] = (began, ended)
        with self.log.open("a") as out:
            out.write(json.dumps({"command": what, "began": began, "ended": ended, "exit": code,
                                  "said": output[-300:]}) + "\n")


def _killed_then_resumed(db, commands: Commands, *command: str) -> None:
    """``command`` killed part-way while the clients write, then run again: it resumes and
    ends well."""
    began = time.time()
    died = toolkit_process(db, *command, *BATCH, env=KILL)
    commands.ran(f"{' '.join(command[:2])} (killed)", began, died.returncode, died.stderr)
    assert died.returncode == -signal.SIGKILL, (command, died.returncode, died.stderr[-2000:])
    began = time.time()
    resumed = toolkit(db, *command, *BATCH)
    commands.ran(f"{' '.join(command[:2])} (resumed)", began, resumed.exit_code, resumed.output)
    assert resumed.exit_code == 0, f"{command}: {resumed.output[-3000:]}"
    TALLY["milestone commands killed with SIGKILL, then resumed, while MLflow clients wrote"] += 1


def _models_named(db, experiments: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Those of ``experiments`` that have no model with their name as display name."""
    return [(p, n) for p, n in experiments
            if db.scalar("SELECT count(*) FROM ml_models WHERE project_id = :p AND display_name = :n",
                         p=p, n=n) != 1]


def test_training_clients_write_through_every_milestone_and_rollback_and_read_back(db, tmp_path):
    projects = [r[0] for r in db.rows("SELECT id FROM projects ORDER BY id")][:CLIENTS]
    log = tmp_path / "serve.stderr"
    with serve_process(db, "--allow-writes", stderr=log) as (_, server):
        workload = Workload(server, projects, clients=CLIENTS, seed=SEED, folder=tmp_path / "journals",
                            pause_s=0.1)
        with workload:
            _wait_for(workload, "a run each", lambda entries: len({e["worker"] for e in entries
                                                                    if e.get("op") == "ended"}) == CLIENTS)
            before: dict[str, Path] = {}
            commands = Commands(workload.folder / "commands.jsonl")
            done: dict[str, float] = {}
            for milestone in MILESTONES:
                before[milestone] = tmp_path / f"before-{milestone}.json"
                workload.pause()  # no client run open: none the clients will still change
                taken = toolkit(db, "fingerprint", "--out", str(before[milestone]))
                workload.resume()
                assert taken.exit_code == 0, taken.output
                _killed_then_resumed(db, commands, "migrate", milestone, "--yes")
                done[milestone] = time.time()
                _more_runs(workload, CLIENTS, f"more runs after {milestone}")
                verified = toolkit(db, "verify", milestone)  # no re-baseline: the writes are the server's
                assert verified.exit_code == 0, (milestone, verified.output[-3000:])
                if milestone in ("milestone-3", "milestone-4"):
                    made = _wait_for(workload, f"a new experiment after {milestone}",
                                     lambda entries, m=milestone: created_since(entries, done[m]))
                    new = created_since(made, done[milestone])
                    assert _models_named(db, new) == [], (milestone, new)
                    TALLY["experiments MLflow clients created as models after milestones 3 and 4"] += len(new)
            for milestone in reversed(MILESTONES):
                _killed_then_resumed(db, commands, "rollback", milestone)
                workload.resume()
                # clients that met 503s back off: each gets on again before the next command
                _more_runs(workload, CLIENTS, f"more runs after rolling back {milestone}")
                compared = toolkit(db, "fingerprint", "--compare", str(before[milestone]))
                assert compared.exit_code == 0, (milestone, compared.output[-3000:])
            _more_runs(workload, CLIENTS, "more runs after the last rollback")
        assert all(code == 0 for code in workload.stop()), [p.read_text()[-1500:]
                                                           for p in workload.folder.glob("*.stderr")]
        report = read_back(server, workload.journals)
    statuses = [int(s) for s in re.findall(r"^access: \S+ \S+ (\d{3}) ", log.read_text(), flags=re.M)]
    assert report.runs and report.metrics and report.experiments_created and report.versions, report.as_dict()
    assert report.lost == [] and report.duplicated == [], json.dumps(report.as_dict(), indent=1, ensure_ascii=False)
    assert report.not_acknowledged == 0, report.as_dict()["errors"]
    assert not report.other_5xx, report.other_5xx
    assert [s for s in statuses if s >= 500 and s != 503] == []
    written = write_latencies(list(read_journals(workload.journals)))
    during = {what: sum(1 for t, _ in written if began <= t <= ended)
              for what, (began, ended) in commands.windows.items()}
    # the clients wrote while each run of each command ran; while milestone 4 rolls back,
    # writes wait (503, retried), so its runs may see none acknowledged
    assert all(n for what, n in during.items() if not what.startswith("rollback milestone-4")), during
    TALLY["MLflow writes acknowledged during the milestones and read back"] += report.calls
    TALLY["503s MLflow clients retried during schema changes"] += report.retried_503


def test_writes_while_milestone_4_is_applied(db, tmp_path):
    """What the clients are held from above: two clients write three iterations each with
    milestone 4 applied. Every call must be acknowledged and read back, their new
    experiments must be models with their names as display names, and `rollback
    milestone-4` must rebuild them with their runs, read back the same."""
    for milestone in MILESTONES:
        done = toolkit(db, "migrate", milestone, "--yes")
        assert done.exit_code == 0, done.output[-2000:]
    applied = time.time()
    projects = [r[0] for r in db.rows("SELECT id FROM projects ORDER BY id")][:2]
    with serve_process(db, "--allow-writes", stderr=tmp_path / "serve.stderr") as (_, server):
        workload = Workload(server, projects, clients=2, seed=SEED, folder=tmp_path / "journals", iterations=3,
                            label="m4", env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})
        assert workload.start().wait(timeout_s=120) == [0, 0]
        report = read_back(server, workload.journals)
        assert report.not_acknowledged == 0, report.as_dict()["errors"]
        assert report.lost == [] and report.duplicated == [], report.as_dict()
        new = created_since(list(read_journals(workload.journals)), applied)
        assert new and _models_named(db, new) == [], new
        rolled = toolkit(db, "rollback", "milestone-4")
        assert rolled.exit_code == 0, rolled.output[-2000:]
        again = read_back(server, workload.journals)
        assert again.lost == [] and again.duplicated == [], again.as_dict()
