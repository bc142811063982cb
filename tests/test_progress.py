"""What a run shows while it works and when it is stopped and resumed.

* On an 80-column terminal (a real pseudo-terminal, its window size set as a terminal
  sets it) the bar keeps the pass name, the percentage, the rate and the time left.
* Off a terminal, ``progress:`` lines name the pass, count keys scanned and rows changed
  (the rows ``plan`` and the pass's closing line count), and give no time left before a
  tenth of the pass has run; the estimate itself is checked on a simulated pass.
* A run stopped by Ctrl-C has said one line per pass it finished; the next run says where
  it resumes, does not walk the finished passes again, and ends where an uninterrupted
  run ends. A run that does not resume walks every pass, whatever was finished before.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from contract import KILL_BATCH_SIZE
from faults import start_toolkit
from helpers import differences, end_state, toolkit, toolkit_json, toolkit_process

from toolkit.errors import ExitCode

M1_PASS = "convert-candidate-packages"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
EVERY_BATCH = {"TOOLKIT_PROGRESS_EVERY_S": "0"}


def in_a_terminal(db, *args: str, columns: int = 80, timeout_s: float = 120) -> tuple[int, str]:
    """Run the toolkit with a pseudo-terminal of ``columns`` columns as its stdin, stdout
    and stderr; returns its exit code and everything the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "TOOLKIT_DATABASE_URL": db.url_text, "COLUMNS": str(columns),
           "LINES": "24", "TERM": "xterm"}
    process = subprocess.Popen([sys.executable, "-m", "toolkit", *args], stdin=slave, stdout=slave,
                               stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed, the run is over
                break
            if not chunk:
                break
            received += chunk
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return code, received.decode(errors="replace")


def screen_lines(text: str) -> list[str]:
    """Each line as it was drawn: a bar is redrawn after a carriage return."""
    return [ANSI.sub("", part) for part in re.split(r"\r\n|\r|\n", text)]


def test_on_an_80_column_terminal_the_bar_shows_the_pass_rate_and_time_left(realistic_db):
    db = realistic_db
    code, shown = in_a_terminal(db, "migrate", "milestone-1", "--yes", "--batch-size", "2",
                                "--pause-ms", "80")
    assert code == 0, shown
    bars = [line for line in screen_lines(shown) if "%|" in line]
    assert len(bars) >= 5, shown
    too_wide = [line for line in bars if len(line.rstrip()) > 80]
    assert not too_wide, too_wide
    assert all(line.startswith(f"{M1_PASS} ") and re.search(r" \d+%\|", line) for line in bars), bars
    # once the pass is under way: its keys, the rate and the time left, uncut
    rated = [line for line in bars if re.search(r"\| \d+/\d+ keys, [\d.,]+k?/s, \d\d:\d\d left$",
                                                line.rstrip())]
    assert len(rated) >= 3, bars
    # the pass's closing line follows once the bar is gone
    assert re.search(rf"  {M1_PASS}: \d+ rows changed in \d+ batches", shown), shown


def test_a_long_pass_name_is_shortened_in_the_middle():
    from toolkit.progress import LABEL_MAX, label

    assert label("create-models-for-experiments:revert-metadata") == "create-model…s:revert-metadata"
    assert len(label("create-models-for-experiments:revert-metadata")) == LABEL_MAX
    assert label(M1_PASS) == M1_PASS


def test_on_a_narrower_terminal_the_bar_still_fits_with_its_rate_and_time_left(make_database):
    db = make_database("realistic:small")
    code, shown = in_a_terminal(db, "migrate", "milestone-1", "--batch-size", "2", "--pause-ms", "30",
                                columns=64)
    assert code == 0, shown
    bars = [line.rstrip() for line in screen_lines(shown) if "%|" in line]
    assert bars and all(len(line) <= 64 for line in bars), bars
    assert any(re.search(r"[\d.,]+k?/s, \d\d:\d\d left$", line) for line in bars), bars


def _progress(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("progress: ")]


LINE = re.compile(r"progress: (?P<name>[\w:-]+): (?P<done>[\d,]+) of (?P<total>[\d,]+) keys scanned "
                  r"\((?P<share>\d+)%\), (?P<changed>[\d,]+) rows changed, [\d,]+ keys/s, "
                  r"(?P<eta>about [\d,]+ s left|time left not yet estimated)$")


def test_progress_lines_name_the_pass_and_count_keys_scanned_and_rows_changed(realistic_db):
    db = realistic_db
    planned = next(s for s in toolkit_json(db, "plan", "milestone-1")[1]["result"]["milestones"][0]["steps"]
                   if s["step"] == M1_PASS)["rows"]
    keys = db.scalar("SELECT count(*) FROM ml_candidates WHERE package_id IS NOT NULL")
    run = toolkit_process(db, "migrate", "milestone-1", "--batch-size", "2", env=EVERY_BATCH)
    assert run.returncode == 0, run.stderr
    lines = _progress(run.stderr)
    parsed = [LINE.fullmatch(line) for line in lines]
    assert lines and all(parsed), lines
    assert {m["name"] for m in parsed} == {M1_PASS}
    count = [int(m["done"].replace(",", "")) for m in parsed]
    assert count == sorted(count) and count[-1] == keys and {m["total"] for m in parsed} == {f"{keys:,}"}
    changed = [int(m["changed"].replace(",", "")) for m in parsed]
    assert changed == sorted(changed)
    # the rows changed are those plan counted and the pass's closing line reports
    assert changed[-1] == planned > 0
    assert f"  {M1_PASS}: {planned} rows changed in " in run.stdout
    assert planned < keys  # keys scanned are not rows changed: the line says which is which
    # no time left before a tenth of the keys and a few batches; then always one
    from toolkit.progress import ESTIMATE_AFTER_BATCHES, ESTIMATE_AFTER_SHARE

    for batches, (done, m) in enumerate(zip(count, parsed, strict=True), start=1):
        estimated = batches >= ESTIMATE_AFTER_BATCHES and done >= ESTIMATE_AFTER_SHARE * keys
        assert m["eta"].startswith("about") == estimated, (batches, lines)


def test_the_first_time_left_is_close_to_the_time_the_pass_then_takes():
    """A simulated pass (a clock of the test's own): a slow first batch (a cold cache), then
    batches growing to their size, then steady. No time left is given at first; the first
    one given is within a fifth of what the pass then takes. (The average since the start,
    at the first line, would have been over three times what it took.)"""
    from toolkit.progress import ProgressLines

    batches = [(1000, 4.0)] + [(size, 0.02 + size / 10_000) for size in (2000, 4000, 8000, 16_000)]
    batches += [(50_000, 5.02)] * 20
    total = sum(size for size, _ in batches)
    now, lines = [0.0], []
    progress = ProgressLines(lines.append, "link-candidates", total, every_s=5, clock=lambda: now[0])
    said: list[tuple[str, float, int, float]] = []  # each line, the time left in truth, done, when
    done = 0
    for i, (size, took) in enumerate(batches):
        now[0] += took
        done += size
        before = len(lines)
        progress.update(size, size // 2)
        if len(lines) > before:
            said.append((lines[-1], sum(t for _, t in batches[i + 1:]), done, now[0]))
    first_line, truth_then, done_then, when = said[0]
    assert "time left not yet estimated" in first_line, said
    assert (total - done_then) / (done_then / when) > 3 * truth_then  # what the average would say
    estimated = [(line, truth) for line, truth, _, _ in said if "about" in line]
    assert estimated, said
    line, truth = estimated[0]
    given = float(line.split("about ")[1].split(" s left")[0].replace(",", ""))
    assert abs(given - truth) <= truth / 5, (line, truth)


# -- stopped and resumed -----------------------------------------------------------------
M3_FINISHED = ["backfill-display-name", "create-models-for-experiments"]


def _checkpoint(db, step: str) -> tuple:
    return tuple(db.rows("SELECT last_key, completed_at IS NOT NULL, run_id, batches_done "
                         "FROM toolkit.checkpoints WHERE milestone = 'milestone-3' AND step = :s",
                         s=step)[0])


def test_a_stopped_run_lists_its_finished_passes_and_the_next_resumes_without_walking_them(
        milestone_states, make_database, tmp_path: Path, monkeypatch):
    clean, applied = milestone_states.applied("adversarial", 3)  # uninterrupted, same batches
    assert applied.code == 0, applied.doc
    db = make_database(like=milestone_states.before("adversarial", 3))
    batch = str(KILL_BATCH_SIZE)
    monkeypatch.setenv("TOOLKIT_PROGRESS_EVERY_S", "0")
    run = start_toolkit(db, ("migrate", "milestone-3", "--batch-size", batch, "--pause-ms", "50"),
                        tmp_path, "stopped")
    deadline = time.monotonic() + 60
    while not db.scalar("SELECT to_regclass('toolkit.checkpoints') IS NOT NULL AND EXISTS ("
                        "SELECT 1 FROM toolkit.checkpoints WHERE step = 'link-candidates' "
                        "AND batches_done >= 2)"):
        assert time.monotonic() < deadline and run.process.poll() is None, run.stderr.read_text()
        time.sleep(0.01)
    run.process.send_signal(signal.SIGINT)
    code, stdout, stderr = run.wait(60)
    assert code == ExitCode.INTERRUPTED, stderr
    # one line per pass and schema change it finished, and the one it was stopped in
    for name in M3_FINISHED:
        assert re.search(rf"^  {name}: \d+ rows changed in \d+ batch", stdout, re.M), stdout
    assert re.search(r"^  add-display-name: schema changed", stdout, re.M), stdout
    assert re.search(r"^  link-candidates: stopped \(interrupted\) after \d+ rows", stdout, re.M), stdout
    stopped_at, done, stopped_by, _ = _checkpoint(db, "link-candidates")
    assert not done and stopped_at > 0
    finished = {name: _checkpoint(db, name) for name in M3_FINISHED}
    assert all(cp[1] for cp in finished.values()), finished

    resumed = toolkit_process(db, "migrate", "milestone-3", "--batch-size", batch, env=EVERY_BATCH)
    assert resumed.returncode == 0, resumed.stderr
    assert (f"Resuming milestone-3 at link-candidates after key {stopped_at} (where run {stopped_by} "
            f"stopped); finished before, not walked again: {', '.join(M3_FINISHED)}") in resumed.stdout
    for name in M3_FINISHED:
        assert re.search(rf"^  {name}: finished before \(\d+ rows? changed\); not walked again$",
                         resumed.stdout, re.M), resumed.stdout
    # not walked: no progress of theirs, their checkpoints as the stopped run left them,
    # and no rows of theirs in the resumed run's history
    assert {LINE.fullmatch(line)["name"] for line in _progress(resumed.stderr)} == {"link-candidates"}
    assert {name: _checkpoint(db, name) for name in M3_FINISHED} == finished
    rows = db.scalar("SELECT rows_by_step FROM toolkit.runs ORDER BY id DESC LIMIT 1")
    assert all(rows.get(name, 0) == 0 for name in M3_FINISHED) and rows["link-candidates"] > 0, rows
    state = end_state(db)
    assert state == end_state(clean), differences(state, end_state(clean))


def test_a_run_that_does_not_resume_walks_every_pass_whatever_was_finished_before(milestone_states,
                                                                                 make_database):
    """Applied, then migrated again and stopped in its first pass: the resume walks the
    passes after it too (finished the time before, not by this attempt)."""
    clean, _ = milestone_states.applied("adversarial", 3)
    db = make_database(like=clean)
    again = toolkit(db, "migrate", "milestone-3", "--batch-size", "1", "--max-batches", "1")
    assert again.exit_code == 0, again.output
    assert "Resuming" not in again.output
    assert "  backfill-display-name: stopped (max-batches) after 0 rows in 1 batch" in again.output
    resumed = toolkit_process(db, "migrate", "milestone-3", "--batch-size", "50", env=EVERY_BATCH)
    assert resumed.returncode == 0, resumed.stderr
    line = next(line for line in resumed.stdout.splitlines() if line.startswith("Resuming"))
    assert line.startswith("Resuming milestone-3 at backfill-display-name after key ") and \
        "finished before" not in line, line
    walked = {LINE.fullmatch(line)["name"] for line in _progress(resumed.stderr)}
    assert walked == {"backfill-display-name", "create-models-for-experiments", "link-candidates"}, walked


def test_a_stopped_rollback_resumes_where_it_stopped(milestone_states, make_database):
    clean, _ = milestone_states.applied("adversarial", 3)
    db = make_database(like=clean)
    first = toolkit(db, "rollback", "milestone-3", "--batch-size", "2", "--max-batches", "3")
    assert first.exit_code == 0, first.output
    assert re.search(r"^  create-models-for-experiments:revert: stopped \(max-batches\) after \d+ rows",
                     first.output, re.M), first.output
    stopped_at = db.scalar("SELECT last_key FROM toolkit.checkpoints WHERE milestone = 'milestone-3' "
                           "AND step = 'create-models-for-experiments:revert'")
    resumed = toolkit(db, "rollback", "milestone-3", "--batch-size", "2")
    assert resumed.exit_code == 0, resumed.output
    assert (f"Resuming the rollback of milestone-3 at create-models-for-experiments:revert after key "
            f"{stopped_at}") in resumed.output
    assert db.scalar("SELECT state FROM toolkit.milestones WHERE milestone = 'milestone-3'") == "rolled_back"
