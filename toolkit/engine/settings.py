"""A run's settings, as one typed tree: each default and each bound written once, here.

The tree has a section per concern: :class:`Batching`, :class:`Stopping`, :class:`Timeouts`,
:class:`LockWait`, :class:`Reconnect`, the health throttle's :class:`Limits`, :class:`Hold`
(before milestone 4's drops) and :class:`Resume`. :class:`RunOptions` is every section at once (it inherits
them), so the batch loop reads ``options.batch_size`` and the throttle is handed the run's
options as its :class:`Limits`, the same object: ``toolkit control set`` changes the value
both read, and nothing is copied field by field.

Each field that the operator sets carries a :class:`Spec` (its public name, which is both
the option ``--name`` and the key of ``toolkit control set name=``; its :class:`Bound`; and
whether a running run may change it). The CLI generates its options, their help's defaults
and bounds, and ``control set``'s conversion from these, so what ``--help`` says and what a
value is refused for are the engine's numbers. A leaf of the engine: it imports nothing of
the toolkit's, so every layer can read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

PG_INT_MAX = 2**31 - 1  # PostgreSQL's integer settings: lock_timeout, statement_timeout (ms)
BIGINT_MAX = 2**63 - 1
MAX_BATCH_SIZE = 10_000_000  # keys in one batch, one short transaction
MAX_TRIES = 10_000  # retries and reconnects: beyond this a run is not waiting, it is stuck
MAX_SECONDS = 366 * 24 * 3600  # a year: longer than any run, any wait, any limit
MAX_RECONNECT_DELAY_S = 30.0  # the longest wait between two reconnects (doubling up to it)
# A second: a batch's row locks keep GitLab's updates of those rows waiting at most that
# long (inserts never wait), and a batch's fixed cost stays a few percent. Half a second
# cost milestone 3 a quarter of its throughput at x25: each batch of experiments rewrites
# pages all over ml_candidates, whose rows are not stored by experiment.
DEFAULT_TARGET_BATCH_MS = 1000
SPEC = "toolkit.setting"  # the dataclass field metadata key of a field's Spec


@dataclass(frozen=True)
class Bound:
    """The values a setting takes. ``kind``: ``whole`` (an integer), ``seconds`` or ``rate``
    (a finite float, MB/s for a rate), ``text`` (not empty), ``path`` (a flag file that can
    exist), ``flag`` (on or off). ``why`` says where the upper bound comes from (or, for
    text, what to give); ``whole_ms``: seconds that become a PostgreSQL timeout in ms."""

    kind: str
    low: float = 0
    high: float = 0
    why: str = ""
    unit: str = ""
    whole_ms: bool = False

    def parse(self, text: str) -> Any:
        """A value as stored (``control set``'s, already checked by the CLI) back to its type."""
        return int(text) if self.kind == "whole" else float(text) if self.kind in ("seconds", "rate") \
            else text


# One per kind of number; the CLI's parameter types are built from these (cli/params.py).
TIMEOUT_MS = Bound("whole", 1, PG_INT_MAX, "PostgreSQL's largest lock_timeout and statement_timeout",
                   " ms")
DURATION_MS = Bound("whole", 0, PG_INT_MAX,
                    "about 24 days, the largest millisecond setting PostgreSQL has", " ms")
BATCH_SIZE = Bound("whole", 1, MAX_BATCH_SIZE, "a batch is one short transaction")
TRIES = Bound("whole", 0, MAX_TRIES, "beyond that a run is stuck, not waiting")
BATCHES = Bound("whole", 1, PG_INT_MAX, "more batches than any table has keys for")
BYTES = Bound("whole", 0, BIGINT_MAX, "PostgreSQL's bigint")
SEGMENTS = Bound("whole", 0, PG_INT_MAX, "more WAL segments than a server can keep")
SECONDS = Bound("seconds", 0, MAX_SECONDS, "a year")
# 0.001 MB/s (about 1 kB/s) to 1 TB/s: below, a checkpoint alone would hold a run
WAL_RATE = Bound("rate", 0.001, 1024 * 1024, "no server writes WAL a terabyte a second")
SQL_QUERY = Bound("text", why="a query that returns true or false")
FLAG_FILE = Bound("path")
FLAG = Bound("flag")


@dataclass(frozen=True)
class Spec:
    """What the operator sees of a field: ``key`` names the option (``--key``) and the
    ``control set`` key; ``settable``: a running run takes a new value (``toolkit control
    set``); ``only``: the one command that has the option (None: every writing command)."""

    key: str
    bound: Bound
    settable: bool = False
    only: str | None = None


def setting(default: Any, key: str, bound: Bound, *, settable: bool = False,
            only: str | None = None) -> Any:
    """A field the operator sets: its default, and its :class:`Spec`."""
    return field(default=default, metadata={SPEC: Spec(key, bound, settable, only)})


@dataclass
class Batching:
    """How big each batch is, and how long between two. Without a target the size is fixed;
    with one it adapts (sizing.py) between the smallest and the largest size."""

    batch_size: int = setting(1000, "batch-size", BATCH_SIZE, settable=True)
    target_batch_ms: int | None = setting(None, "target-batch-ms", DURATION_MS, settable=True)
    min_batch_size: int = 100
    max_batch_size: int = 50_000
    pause_ms: int = setting(0, "pause-ms", DURATION_MS, settable=True)


@dataclass
class Stopping:
    """How much of the work to do now: the next run resumes where this one stopped."""

    max_batches: int | None = setting(None, "max-batches", BATCHES)
    max_runtime_s: float | None = setting(None, "max-runtime", SECONDS)


@dataclass
class Timeouts:
    """How long a statement may wait and run, and how often a batch is retried."""

    lock_timeout_ms: int = setting(2000, "lock-timeout-ms", TIMEOUT_MS)
    statement_timeout_ms: int = setting(60_000, "statement-timeout-ms", TIMEOUT_MS)
    retries: int = setting(5, "retries", TRIES)
    backoff_s: float = 0.5
    # A DDL statement waiting for its lock queues every later query on the table behind it,
    # so it waits only briefly and retries more often (GitLab's with_lock_retries does the same).
    ddl_lock_timeout_ms: int = setting(100, "ddl-lock-timeout-ms", TIMEOUT_MS)
    ddl_retries: int = setting(20, "ddl-retries", TRIES)
    ddl_backoff_max_s: float = 5.0


@dataclass
class LockWait:
    """How long a command polls for the one-runner lock before it gives up (busy)."""

    lock_wait_s: float = setting(10.0, "lock-wait", SECONDS)


@dataclass
class Reconnect:
    """After the database ends the session (restart, failover, terminated session): resume
    by itself this many times, waiting ``reconnect_backoff_s``, doubling, at most
    ``MAX_RECONNECT_DELAY_S``."""

    reconnect: int = setting(0, "reconnect", TRIES)
    reconnect_backoff_s: float = 1.0


@dataclass
class Limits:
    """The health throttle's limits (health.py): wait before a batch or schema change while
    a signal is over its limit, at most ``max_throttle_s`` in all (None: no limit)."""

    max_replica_lag_ms: int = setting(1500, "max-replica-lag-ms", DURATION_MS,
                                      settable=True)  # gh-ost's --max-lag-millis
    # one WAL segment: a second or two of replay
    max_replica_lag_bytes: int = setting(16 * 1024 * 1024, "max-replica-lag-bytes", BYTES,
                                         settable=True)
    max_transaction_age_s: float = setting(60.0, "max-transaction-age-s", SECONDS, settable=True)
    # WAL segments waiting to be archived beyond those waiting when the run started: 16 is
    # 256 MB at the default segment size, a backlog the archiver should clear in seconds.
    max_archive_backlog: int = setting(16, "max-archive-backlog", SEGMENTS, settable=True)
    # WAL MB/s over a few seconds (walrate.py); None: the WAL rate is not a signal
    max_wal_rate_mb_s: float | None = setting(None, "max-wal-rate", WAL_RATE, settable=True)
    throttle_query: str | None = setting(None, "throttle-query", SQL_QUERY)
    throttle_flag_file: str | None = setting(None, "throttle-flag-file", FLAG_FILE)
    no_throttle: bool = setting(False, "no-throttle", FLAG)
    max_throttle_s: float | None = setting(None, "max-throttle-s", SECONDS, settable=True)


@dataclass
class Hold:
    """Wait before the milestone's first drop (Milestone.hold_point) until `toolkit control
    unpostpone`, or, with the flag file, until it is gone (control.hold)."""

    hold_before_drop: bool = setting(False, "hold-before-drop", FLAG, only="migrate")
    hold_flag_file: str | None = setting(None, "hold-flag-file", FLAG_FILE, only="migrate")


@dataclass
class Resume:
    """Resume an unfinished milestone another toolkit version (or other write options) left
    (writer.py); without it such a resume is refused."""

    resume_with_this_version: bool = setting(False, "resume-with-this-version", FLAG)


# The tree, in the order its options are listed. RunOptions holds all of it but LockWait
# (which the runner takes apart: it is how long to wait for a run, not part of one).
SECTIONS: tuple[type, ...] = (Hold, Batching, Stopping, Timeouts, LockWait, Reconnect, Limits, Resume)


@dataclass
class RunOptions(Resume, Hold, Limits, Reconnect, Timeouts, Stopping, Batching):
    """A run's settings: every section of the tree (but LockWait) in one object."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Entry:
    """One setting the operator sets: its field, default and spec."""

    name: str
    default: Any
    spec: Spec


def entries() -> Iterator[Entry]:
    """Every setting the operator sets, section by section, in the tree's order."""
    for section in SECTIONS:
        for f in fields(section):
            if SPEC in f.metadata:
                yield Entry(f.name, None if f.default is MISSING else f.default, f.metadata[SPEC])


SETTABLE: dict[str, Entry] = {e.spec.key: e for e in entries() if e.spec.settable}
SIZING = ("batch-size", "target-batch-ms")  # a new value of these: the pass makes a new sizer


def batch_target(batch_size: int | None, target_batch_ms: int | None) -> int | None:
    """An operator who names a batch size gets exactly that size; one who names neither
    gets batches sized to the default time budget."""
    if target_batch_ms is None:
        return None if batch_size is not None else DEFAULT_TARGET_BATCH_MS
    return target_batch_ms or None


def from_operator(given: dict[str, Any]) -> tuple[RunOptions, float]:
    """The run's options and its lock wait, from the values the operator gave (by field name;
    a setting left out takes its default). The one place that says what naming a batch
    size, or not, means: a batch size not given (None) starts at the tree's and adapts."""
    values = dict(given)
    lock_wait = values.pop("lock_wait_s", None)
    if "batch_size" in values:
        values["target_batch_ms"] = batch_target(values["batch_size"], values.get("target_batch_ms"))
        if values["batch_size"] is None:
            del values["batch_size"]
    return RunOptions(**values), LockWait.lock_wait_s if lock_wait is None else lock_wait
