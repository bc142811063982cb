"""The database server runs out of a resource in the middle of a run: a resumable stop.

A real full disk: a tablespace on a small tmpfs of the test's own (mounted as root, as CI
runs), holding ``ml_models``, with a file filling it but for two pages. Milestone 3 creates
models into it in batches of 4 until PostgreSQL cannot extend the table's file
(``could not extend file … No space left on device``, SQLSTATE 53100). Then:

- the run exits 75 with one line: the disk is full, everything committed is kept, free
  disk space, then run the same command again; no traceback;
- history records the run as ``interrupted`` with that line (the SQLSTATE and the
  server's words), written from another connection, and the rows its committed batches
  changed;
- once the filler is removed, the same command ends in the state of an uninterrupted twin
  (but for the ids the failed batch took from the sequences: compared by natural key).

And ``pg_wal`` full: a server of the test's own whose ``pg_wal`` is moved to a tmpfs just
larger than its one segment; the run commits batches, the test writes WAL until the
segment is nearly full, the run's next batches need a new segment: PostgreSQL PANICs
(``could not write to file "pg_wal/xlogtemp…": No space left on device``), and its crash
recovery cannot finish either, so the server stays down. The run exits 75 saying to free
disk space; nothing can record its end, so it keeps it on the machine; once the tmpfs is
made larger and the server started, the same command records it on the abandoned run and
ends equal to the twin. A connection refused for too many clients (53300) is checked
against a real server that refuses it. Not reproduced: 53200 (out of memory) and 53400
(a configured limit): they take the same path as 53100 and 53300.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from faults import (
    FaultServer,
    ServerDb,
    checkpoint_rows,
    id_free,
    newest_run_id,
    start_toolkit,
    wait_for_batches,
)
from helpers import differences, end_state, resolve_m1_anomalies, toolkit

from toolkit.errors import ExitCode, without_database_urls
from toolkit.sandbox.generator import seed_database
from toolkit.sandbox.scales import SCALES
from toolkit.sandbox.server import SYSTEM_USER_WHEN_ROOT

BATCH = ("--batch-size", "4")
COMMAND = ("migrate", "milestone-3", "--yes", *BATCH)
SEQUENCE_ID_PARTS = {"tables.ml_models", "tables.ml_model_metadata", "tables.ml_candidates",
                     "tables.ml_experiments", "ledgers.m3_created_models", "ledgers.m3_copied_metadata"}


class Tmpfs:
    """A small tmpfs mounted for the test (root only), unmounted at the end."""

    def __init__(self, size: str):
        self.path = Path(tempfile.mkdtemp(prefix="tk-small-fs-"))
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                               str(self.path)], capture_output=True, text=True)
        if done.returncode != 0:
            os.rmdir(self.path)
            pytest.skip(f"a small filesystem for a tablespace needs `mount -t tmpfs` (root): "
                        f"{done.stderr.strip() or done.returncode}")

    def free(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int) -> Path:
        """A file taking all the space but ``leave`` bytes."""
        filler = self.path / "filler"
        with filler.open("wb") as out:
            out.write(b"\0" * max(0, self.free() - leave))
        return filler

    def close(self) -> None:
        subprocess.run(["umount", str(self.path)], check=False)
        os.rmdir(self.path)


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("a tablespace on a small filesystem needs root to mount it (CI runs as root)")
    with FaultServer.started() as server:
        seeded = server.database("tpl_seeded")
        with seeded.engine.connect() as conn:
            seed_database(conn, SCALES["small"], "adversarial", seed=1)
        resolve_m1_anomalies(seeded)
        for milestone in ("milestone-1", "milestone-2"):
            done = toolkit(seeded, "migrate", milestone, "--yes")
            assert done.exit_code == 0, done.output
        seeded.dispose()
        yield server


def _history(db: ServerDb, after_run: int) -> list[dict]:
    done = toolkit(db, "--json", "history", "--limit", "50")
    assert done.exit_code == 0, done.output
    return sorted((r for r in json.loads(done.stdout)["result"]["runs"] if r["id"] > after_run),
                  key=lambda r: r["id"])


def _rows(run: dict) -> dict[str, int]:
    return {step: rows for step, rows in (run["rows_by_step"] or {}).items() if rows}


def _one_error_line(code: int, stdout: str, stderr: str) -> str:
    assert code == ExitCode.SESSION_LOST, f"exit {code}\n{stdout}\n{stderr}"
    assert "Traceback" not in stdout + stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def twin(lab: FaultServer, tmp_path_factory) -> tuple[int, tuple, dict, Path]:
    """The uninterrupted run's rows, end state, end state by natural key, and the file of
    its `toolkit fingerprint --out`."""
    db = lab.database("twin", template="tpl_seeded")
    done = toolkit(db, "--json", *COMMAND)
    assert done.exit_code == 0, done.output
    fingerprint = tmp_path_factory.mktemp("twin") / "twin.json"
    taken = toolkit(db, "fingerprint", "--out", str(fingerprint))
    assert taken.exit_code == 0, taken.output
    made = json.loads(done.stdout)["result"]["rows"], end_state(db), id_free(db), fingerprint
    lab.drop("twin")
    return made


def _equal_to_twin(db: ServerDb, runs: list[dict], twin: tuple[int, tuple, dict, Path]) -> None:
    twin_rows, twin_state, twin_ids, _ = twin
    assert sum(sum(_rows(r).values()) for r in runs) == twin_rows, runs
    state = end_state(db)
    # a batch rolled back had taken ids from ml_models' sequence: models created after it
    # have other ids than the twin's, and nothing else differs
    assert set(differences(state, twin_state)) <= SEQUENCE_ID_PARTS, differences(state, twin_state)
    assert id_free(db) == twin_ids


def test_a_full_tablespace_during_milestone_3_stops_resumably_and_ends_equal(lab: FaultServer, twin,
                                                                               tmp_path: Path):

    db = lab.database("full", template="tpl_seeded")
    small = Tmpfs("4m")
    try:
        owner = pwd.getpwnam(SYSTEM_USER_WHEN_ROOT) if os.geteuid() == 0 else None
        location = small.path / "ts"
        location.mkdir()
        if owner is not None:
            os.chown(location, owner.pw_uid, owner.pw_gid)
        lab._admin(f"CREATE TABLESPACE tk_small LOCATION '{location}'")
        # few rows a page, so the created models need new pages, and every one is on the tablespace
        db.execute("ALTER TABLE ml_models SET (fillfactor = 10)")
        db.execute("ALTER TABLE ml_models SET TABLESPACE tk_small")
        filler = small.fill(leave=16 * 1024)  # two of PostgreSQL's 8 kB pages
        prior = newest_run_id(db)

        running = start_toolkit(db, COMMAND, tmp_path, "full")
        code, stdout, stderr = running.wait()
        line = _one_error_line(code, stdout, stderr)
        assert "disk is full (53100: could not extend file" in line, line
        assert "No space left on device" in line, line
        assert "everything committed before it is kept" in line, line
        assert "free disk space on the database server" in line, line
        assert line.endswith("then run the same command again"), line

        (stopped,) = _history(db, prior)
        committed, batches = checkpoint_rows(db, stopped["id"])
        assert batches >= 1, "the disk was meant to fill after some batches had committed"
        assert stopped["outcome"] == "interrupted", stopped
        assert stopped["error"] == without_database_urls(line.removeprefix("error: ")), stopped
        assert _rows(stopped) == committed, "history's rows are the committed batches'"

        filler.unlink()  # the operator frees space
        again = start_toolkit(db, COMMAND, tmp_path, "again")
        code, stdout, stderr = again.wait()
        assert code == 0, (stdout, stderr)
        runs = _history(db, prior)
        assert [r["outcome"] for r in runs] == ["interrupted", "succeeded"], runs
        _equal_to_twin(db, runs, twin)
        _compare_across_the_gap(db, twin[3], tmp_path)
    finally:
        lab.drop("full")
        lab._admin("DROP TABLESPACE IF EXISTS tk_small")
        small.close()


def test_no_connection_left_is_a_resumable_stop_with_nothing_written(lab: FaultServer):
    """The database allows one connection to the role the run uses: the run's second
    session is refused by the server (53300), before anything is written."""
    db = lab.database("crowded", template="tpl_seeded")
    try:
        db.execute("CREATE ROLE tk_crowded LOGIN NOSUPERUSER CONNECTION LIMIT 1")
        db.execute(f'GRANT "{db.scalar("SELECT current_user")}" TO tk_crowded')  # the tables' owner
        owner = db.scalar("SELECT current_user")
        url = db.url_text.replace(f"://{owner}@", "://tk_crowded@", 1)
        assert "tk_crowded@" in url, url
        prior = newest_run_id(db)
        done = toolkit(type("Db", (), {"url_text": url})(), "migrate", "milestone-3", "--yes")
        assert done.exit_code == ExitCode.SESSION_LOST, done.output
        errors = [line for line in done.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, done.output
        assert "no connection left for the toolkit (53300: " in errors[0], errors[0]
        assert "free connections" in errors[0] and errors[0].endswith("then run the same command again")
        assert newest_run_id(db) == prior, "nothing recorded"
    finally:
        lab.drop("crowded")
        lab._admin("DROP ROLE IF EXISTS tk_crowded")


def test_an_end_the_database_could_not_take_is_recorded_by_the_next_run(lab: FaultServer, twin,
                                                                        tmp_path: Path):
    """The server stops mid-run and is still down when the run records its end: the run
    keeps it on this machine and says so; the next run writes it on the abandoned run
    (not ``stopped unrecorded``), then resumes to the twin's end state."""
    db = lab.database("down", template="tpl_seeded")
    prior = newest_run_id(db)
    running = start_toolkit(db, (*COMMAND, "--pause-ms", "30"), tmp_path, "down")
    run_id = wait_for_batches(db, running, prior, 2)
    db.dispose()
    lab.server.stop()
    try:
        code, stdout, stderr = running.wait()
    finally:
        lab.status = lab.server.start()
    line = _one_error_line(code, stdout, stderr)
    assert line.startswith("error: Interrupted: "), line
    warning = f"warning: could not record how run {run_id} ended ("
    assert warning in stderr and "the next run on this database from this machine records it" in stderr, stderr

    again = start_toolkit(db, COMMAND, tmp_path, "again")
    code, stdout, stderr = again.wait()
    assert code == 0, (stdout, stderr)
    runs = _history(db, prior)
    assert [r["outcome"] for r in runs] == ["interrupted", "succeeded"], runs
    assert runs[0]["error"] == (f"{without_database_urls(line.removeprefix('error: '))} "
                                f"(recorded by run {runs[1]['id']}: the database could not take it then)")
    _equal_to_twin(db, runs, twin)
    lab.drop("down")


def _compare_across_the_gap(db: ServerDb, twin_file: Path, tmp_path: Path) -> None:
    """`toolkit fingerprint --compare` with the twin's file says equal across the sequence
    gap, naming what it compared by natural key; the same file without them (as a toolkit
    before this took it) compares ids and finds the gap."""
    gapped = db.scalar("SELECT max(model_id) FROM toolkit.m3_created_models")
    twin_doc = json.loads(twin_file.read_text())
    assert gapped > twin_doc["watermarks"]["ml_models"], "the rolled-back batch left a gap in the ids"
    done = toolkit(db, "--json", "fingerprint", "--compare", str(twin_file))
    assert done.exit_code == 0, done.output
    said = json.loads(done.stdout)["result"]
    assert said["differences"] == []
    created = db.scalar("SELECT count(*) FROM toolkit.m3_created_models")
    assert [n.split(":")[0] for n in said["natural_keys"]] == [
        "tables.ml_candidates", "tables.ml_experiments", "tables.ml_model_metadata", "tables.ml_models"
    ], said["natural_keys"]
    assert said["natural_keys"][3] == (f"tables.ml_models: {created} rows, models milestone-3 created, "
                                       "by project and name, not id"), said["natural_keys"]
    text = toolkit(db, "fingerprint", "--compare", str(twin_file))
    assert text.exit_code == 0 and "Compared by natural key, as sequence values may differ" in text.output

    by_id = tmp_path / "by-id.json"
    by_id.write_text(json.dumps({k: v for k, v in twin_doc.items() if k != "natural"}))
    done = toolkit(db, "fingerprint", "--compare", str(by_id))
    assert done.exit_code == 1, done.output
    assert "tables.ml_models:" in done.output, done.output


def test_pg_wal_full_panics_the_server_and_the_same_command_resumes_once_space_is_freed(
        lab: FaultServer, twin, tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("pg_wal on a small filesystem needs root to mount it")
    with FaultServer.started() as server:
        seeded = server.database("seeded")
        with seeded.engine.connect() as conn:
            seed_database(conn, SCALES["small"], "adversarial", seed=1)
        resolve_m1_anomalies(seeded)
        for milestone in ("milestone-1", "milestone-2"):
            assert toolkit(seeded, "migrate", milestone, "--yes").exit_code == 0
        seeded.dispose()
        wal = Path(server.server.pgdata) / "pg_wal"
        server.server.stop()
        # room for what is there and one more segment (the start preallocates the next one
        # when the current one is three quarters full), and 2 MB: never a segment more
        small = Tmpfs(str(sum(f.stat().st_size for f in wal.rglob("*") if f.is_file()) + SEGMENT + 2 * 2**20))
        try:
            owner = pwd.getpwnam(SYSTEM_USER_WHEN_ROOT)
            moved = small.path / "pg_wal"
            shutil.copytree(wal, moved, symlinks=True)
            for path in (moved, *moved.rglob("*")):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            os.chmod(moved, 0o700)
            shutil.rmtree(wal)
            os.symlink(moved, wal)
            server.status = server.server.start()
            db = server.databases["seeded"]
            prior = newest_run_id(db)
            running = start_toolkit(db, (*COMMAND, "--pause-ms", "100"), tmp_path, "wal")
            wait_for_batches(db, running, prior, 2)
            _fill_wal_but(db, moved, 64 * 1024)  # the run's next batches need a new segment
            db.dispose()
            code, stdout, stderr = running.wait()
            line = _one_error_line(code, stdout, stderr)
            assert "free disk space" in line and "then run the same command again" in line, line
            assert "No space left on device" in line or "crash" in line, line
            assert "warning: could not record how run" in stderr, stderr
            assert "PANIC:  could not write to file \"pg_wal/xlogtemp" in server.server.logfile.read_text()
            assert not server.server.status().running, "crash recovery could not finish either"

            subprocess.run(["mount", "-o", "remount,size=64m", "tmpfs", str(small.path)], check=True)
            server.status = server.server.start()
            again = start_toolkit(db, COMMAND, tmp_path, "wal-again")
            code, stdout, stderr = again.wait()
            assert code == 0, (stdout, stderr)
            runs = _history(db, prior)
            assert [r["outcome"] for r in runs] == ["interrupted", "succeeded"], runs
            assert runs[0]["error"] == (f"{without_database_urls(line.removeprefix('error: '))} "
                                        f"(recorded by run {runs[1]['id']}: the database could not take it then)")
            # the batches after the last one the crash kept are done again: rows add up
            _equal_to_twin(db, runs, twin)
        finally:
            server.server.stop()
            small.close()


SEGMENT = 16 * 2**20  # PostgreSQL's WAL segment size (initdb's default)


def _fill_wal_but(db: ServerDb, wal: Path, leave: int) -> None:
    """Write WAL (logical messages) until the current segment is the last one there and
    only ``leave`` bytes of it are left."""
    for _ in range(8):
        (name, offset), = db.rows("SELECT file_name, file_offset FROM pg_walfile_name_offset(pg_current_wal_lsn())")
        ahead = [p for p in wal.iterdir() if len(p.name) == 24 and p.name > name]
        remaining = SEGMENT - int(offset)
        db.execute("SELECT pg_logical_emit_message(false, 'tk-test', repeat('x', :n))",
                   n=max(0, remaining - leave) if not ahead else remaining + 1024)
        if not ahead:
            return
    raise AssertionError("WAL segments kept appearing ahead")
