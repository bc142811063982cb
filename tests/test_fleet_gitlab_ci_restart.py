"""What CI's ``retry: exit_codes`` is for, shown for real with gitlab-ci-local (which does
not retry): a database's server restarts during its job, the job fails with exit code 75
(resumable), and the same job run again alone resumes and ends equal to its twin.

The restart needs a server of the module's own (tests/faults.py), never the session's."""

from __future__ import annotations

import json
import subprocess
import time

from faults import FaultServer, newest_run_id
from gitlab_ci_local import gitlab_ci_local, project, run, words
from helpers import differences, end_state, toolkit

from toolkit.sandbox.generator import seed_database
from toolkit.sandbox.scales import SCALES


def test_a_job_whose_server_restarts_fails_resumable_and_its_rerun_resumes_to_its_twins_end(tmp_path):
    """What `retry: exit_codes` is for, shown for real (gitlab-ci-local does not retry):
    the database's server restarts during its job, the job fails with 75 (resumable), and
    the same job run again alone (`gitlab-ci-local JOB`) resumes and ends equal, row for
    row, to a twin database migrated without a fault."""
    binary = gitlab_ci_local()
    with FaultServer.started() as server:
        template = server.database("tpl")
        with template.engine.connect() as conn:
            seed_database(conn, SCALES["small"], "realistic", seed=1)
        template.dispose()
        twin = server.database("twin", template="tpl")
        done = toolkit(twin, "migrate", "milestone-1", "--batch-size", "4")
        assert done.exit_code == 0, done.output
        subject = server.database("subject", template="tpl")
        proj = project(tmp_path / "restart", "databases:\n  - {name: subject, url_env: SUBJECT_URL}\n",
                           {"SUBJECT_URL": subject.url_text}, "milestone-1", "--",
                           "--batch-size", "4", "--pause-ms", "300")
        job = "milestone-1 subject"
        running = subprocess.Popen(words(binary, proj, job), cwd=proj, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for_a_batch(subject, running)
            server.restart("fast")
            said, _ = running.communicate(timeout=240)
        finally:
            if running.poll() is None:
                running.kill()
        assert running.returncode != 0, said
        failed = json.loads((proj / "fleet-artifacts" / "subject" / "job.json").read_text())
        assert failed["exit_code"] == 75 and failed["resumable"] is True, (failed, said)
        assert failed["state_after"] == "in_progress"
        rerun = run(binary, proj, job)
        assert rerun.returncode == 0, rerun.stdout[-3000:]
        resumed = json.loads((proj / "fleet-artifacts" / "subject" / "job.json").read_text())
        assert (resumed["exit_code"], resumed["state_before"], resumed["state_after"]) == \
            (0, "in_progress", "verified")
        assert end_state(subject) == end_state(twin), differences(end_state(subject), end_state(twin))


def _wait_for_a_batch(db, running: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until the job's run has committed a batch (polled; the batches pause 300 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert running.poll() is None, running.stdout.read() if running.stdout else ""
        if newest_run_id(db) and db.scalar("SELECT coalesce(sum(batches_done), 0) FROM toolkit.checkpoints"):
            return
        time.sleep(0.02)
    raise AssertionError("the job committed no batch in time")
