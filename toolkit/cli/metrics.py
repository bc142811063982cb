"""``--metrics-textfile``: the run's metrics as a Prometheus textfile, for node_exporter.

A command-line tool has no port for Prometheus to scrape; Omnibus GitLab ships node_exporter
with a textfile collector, which publishes every ``*.prom`` file of a directory. So the run
rewrites one such file after every batch and at every milestone of its life (start, throttle
waits, end), atomically: a temporary file in the same directory, then ``os.replace``, so the
collector never reads half a file. The names are GitLab's batched background migrations'
(``lib/gitlab/database/background_migration/batched_migration_wrapper.rb``), with
``migration_identifier`` = ``milestone/pass``, so the "Batched Data Migrations" dashboard's
queries apply; what GitLab has no name for is ``toolkit_*``. Documented in docs/operations.md.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import suppress
from pathlib import Path
from typing import Any

from toolkit.errors import ExitCode

# Ends after which the same command resumes: not a failure to page anybody about.
RESUMABLE = {int(ExitCode.OK), int(ExitCode.THROTTLED), int(ExitCode.SESSION_LOST),
             int(ExitCode.INTERRUPTED)}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class MetricsTextfile:
    """A sink of :class:`toolkit.cli.observe.Observed`: keeps the numbers, writes the file."""

    def __init__(self, path: str, database: str | None) -> None:
        self.path = Path(path)
        self.database = database or ""
        self.updated: dict[str, int] = defaultdict(int)  # rows changed, by milestone/pass
        self.batches: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)  # summed batch durations
        self.last_size: dict[str, int] = {}
        self.migrated: dict[str, int] = defaultdict(int)  # driving-table keys done
        self.total: dict[str, int] = {}
        self.last_update: dict[str, float] = {}
        self.wal_bytes: dict[str, int] = defaultdict(int)
        self.throttled: dict[int | None, dict[str, float]] = {}  # by history run, by signal
        self.throttled_now = False
        self.lease_held = False
        self.run_id: int | None = None
        self.started = time.time()
        self.exit_code: int | None = None

    def record(self, name: str, fields: dict[str, Any]) -> None:
        if name == "batch":
            key = f"{fields['milestone']}/{fields['pass_name']}"
            self.updated[key] += fields["rows"]
            self.batches[key] += 1
            self.seconds[key] += fields["ms"] / 1000
            self.last_size[key] = fields["keys"]
            self.migrated[key] += fields["keys"]
            self.last_update[key] = time.time()
            if fields.get("wal_bytes") is not None:
                self.wal_bytes[key] += fields["wal_bytes"]
        elif name == "pass_start":
            key = f"{fields['milestone']}/{fields['pass_name']}"
            self.total[key] = self.migrated[key] + fields["keys"]
            self.last_update.setdefault(key, time.time())
        elif name == "run_start":
            self.run_id, self.lease_held = fields["run_id"], True
        elif name == "throttle":
            self.throttled_now = fields["state"] == "waiting"
            if "throttled_seconds" in fields:
                self.throttled[self.run_id] = fields["throttled_seconds"]
        elif name == "run_end":
            self.lease_held = self.throttled_now = False
            self.throttled[fields["run_id"]] = fields.get("throttled_seconds") or {}
        elif name == "end":
            self.lease_held = self.throttled_now = False
            self.exit_code = fields["exit_code"]
        else:
            return
        self.write()

    def render(self) -> str:
        page = _Page({"database": self.database})
        self._batch_families(page)
        self._run_families(page)
        return page.text()

    def _batch_families(self, page: _Page) -> None:
        """GitLab's batched-migration families, each by milestone/pass, and the WAL written."""
        page.family("batched_migration_job_updated_tuples_total", "counter",
                    "Rows changed by the batches of this command, by milestone/pass.",
                    _by_id(self.updated, "batched_migration_job_updated_tuples_total"))
        page.family("batched_migration_job_duration_seconds", "summary",
                    "Duration of the batches of this command (sum and count), by milestone/pass.",
                    _by_id({k: float(v) for k, v in self.seconds.items()},
                           "batched_migration_job_duration_seconds_sum")
                    + _by_id(self.batches, "batched_migration_job_duration_seconds_count"))
        page.family("batched_migration_job_batch_size", "gauge",
                    "Driving-table keys the last batch took.",
                    _by_id(self.last_size, "batched_migration_job_batch_size"))
        page.family("batched_migration_migrated_tuples_total", "gauge",
                    "Driving-table keys done by this command in the pass.",
                    _by_id(self.migrated, "batched_migration_migrated_tuples_total"))
        page.family("batched_migration_total_tuple_count", "gauge",
                    "Driving-table keys this command had to do in the pass when it started it "
                    "(those left after a resumed run's checkpoint).",
                    _by_id(self.total, "batched_migration_total_tuple_count"))
        page.family("batched_migration_last_update_time_seconds", "gauge",
                    "Unix time of the pass's last committed batch (of its start, before one).",
                    _by_id({k: round(v, 3) for k, v in self.last_update.items()},
                           "batched_migration_last_update_time_seconds"))
        page.family("toolkit_wal_bytes_total", "counter",
                    "WAL the primary wrote during the batches (pg_current_wal_insert_lsn() before and "
                    "after each; other sessions' writes meanwhile included), by milestone/pass.",
                    _by_id(self.wal_bytes, "toolkit_wal_bytes_total"))

    def _run_families(self, page: _Page) -> None:
        """The run's own families: throttling, the lease, its times, how it ended."""
        signals: dict[str, float] = defaultdict(float)
        for by_signal in self.throttled.values():
            for signal, seconds in by_signal.items():
                signals[signal] += seconds
        page.family("toolkit_throttled_seconds_total", "counter",
                    "Seconds waited on the database's health, by signal.",
                    [("toolkit_throttled_seconds_total", {"signal": s}, float(v))
                     for s, v in sorted(signals.items())])
        page.family("toolkit_throttled", "gauge", "1 while the run waits on the database's health.",
                    [("toolkit_throttled", {}, int(self.throttled_now))])
        page.family("toolkit_lease_held", "gauge", "1 while the run holds the runner lock and lease.",
                    [("toolkit_lease_held", {}, int(self.lease_held))])
        page.family("toolkit_run_start_time_seconds", "gauge", "Unix time the command started.",
                    [("toolkit_run_start_time_seconds", {}, round(self.started, 3))])
        page.family("toolkit_last_update_time_seconds", "gauge", "Unix time this file was written.",
                    [("toolkit_last_update_time_seconds", {}, round(time.time(), 3))])
        ended = self.exit_code is not None
        page.family("toolkit_run_finished", "gauge", "1 once the command has ended.",
                    [("toolkit_run_finished", {}, int(ended))])
        page.family("toolkit_run_failed", "gauge",
                    "1 when the command ended with an exit code that is not a resumable stop "
                    "(0, 6, 75, 130 are not failures).",
                    [("toolkit_run_failed", {}, int(ended and self.exit_code not in RESUMABLE))])
        if ended:
            page.family("toolkit_run_exit_code", "gauge", "The command's exit code.",
                        [("toolkit_run_exit_code", {}, self.exit_code)])

    def write(self) -> None:
        """Atomically: node_exporter reads either the last file or this one, never a mix.
        Readable by others (0644): node_exporter seldom runs as the toolkit's user."""
        # one name per process: two runs cannot write the same temporary file
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                os.fchmod(fd, 0o644)  # whatever the umask
                os.write(fd, self.render().encode())
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except BaseException:
            with suppress(OSError):
                os.unlink(temporary)
            raise

    def close(self) -> None:
        pass


class _Page:
    """A Prometheus text exposition being written: each family's HELP and TYPE lines, then
    its samples, every one labelled with the database."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[str, dict, Any]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for sample, labels, value in samples:
            shown = f"{value:g}" if isinstance(value, float) else f"{value}"
            self.lines.append(f"{sample}{_labels(**self.labels, **labels)} {shown}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _by_id(values: dict[str, Any], sample: str) -> list[tuple[str, dict, Any]]:
    """One sample per milestone/pass (its ``migration_identifier``), in their order."""
    return [(sample, {"migration_identifier": k}, v) for k, v in sorted(values.items())]
