"""A run's settings: how big its batches are, how long it waits, when it stops, when it throttles.

A leaf of the engine: the batch loop, the schema changes, the throttle, the runner and the
CLI all read these, so they live apart from any of them (and the imports do not loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RunOptions:
    batch_size: int = 1000  # the first batch's size; every batch's without a target
    # Aim each batch at this many milliseconds, resizing between these bounds (sizing.py).
    target_batch_ms: int | None = None
    min_batch_size: int = 100
    max_batch_size: int = 50_000
    pause_ms: int = 0
    max_batches: int | None = None
    max_runtime_s: float | None = None
    lock_timeout_ms: int = 2000
    statement_timeout_ms: int = 60_000
    retries: int = 5
    backoff_s: float = 0.5
    # A DDL statement waiting for its lock queues every later query on the table behind it,
    # so it waits only briefly and retries more often (GitLab's with_lock_retries does the same).
    ddl_lock_timeout_ms: int = 100
    ddl_retries: int = 20
    ddl_backoff_max_s: float = 5.0
    # After the database ends the session (restart, failover, terminated session): resume
    # by itself this many times, waiting reconnect_backoff_s, doubling, at most 30 s.
    reconnect: int = 0
    reconnect_backoff_s: float = 1.0
    # Throttling on the database's health (health.py): wait before a batch or schema change
    # while a signal is over its limit, at most max_throttle_s in all (None: no limit).
    max_replica_lag_ms: int = 1500
    max_replica_lag_bytes: int = 16 * 1024 * 1024
    max_transaction_age_s: float = 60.0
    max_archive_backlog: int = 16  # WAL segments waiting to be archived, beyond those at the start
    max_wal_rate_mb_s: float | None = None  # WAL MB/s over a few seconds (walrate.py); None: off
    throttle_query: str | None = None
    throttle_flag_file: str | None = None
    # Wait before the milestone's first drop (Milestone.hold_point) until `toolkit control
    # unpostpone`, or, with the flag file, until it is gone (control.hold).
    hold_before_drop: bool = False
    hold_flag_file: str | None = None
    no_throttle: bool = False
    max_throttle_s: float | None = None
    # Resume an unfinished milestone another toolkit version (or other write options) left
    # (writer.py); without it such a resume is refused.
    resume_with_this_version: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
