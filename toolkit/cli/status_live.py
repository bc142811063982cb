"""``toolkit status`` of a running run, and ``--watch``: what the run kept in the database.

A run keeps its progress in ``toolkit.run_progress`` (engine/live.py), so a person on any
host that reaches the database sees what its terminal would show: the phase and pass, keys
done of the keys the pass had, the rate and time left, how much of its time it waited on
the database's health, its last batch, a pause or a hold, and who steered it. Everything
here reads the toolkit's own tables only (no count over GitLab's), in a read-only
transaction, so ``--watch`` can refresh every few seconds on a production database.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import sqlalchemy as sa

from toolkit.cli import params
from toolkit.cli.context import app, envelope
from toolkit.engine import control as steering
from toolkit.engine import live as progress
from toolkit.engine.inspection import Inspector
from toolkit.output import json_value, out
from toolkit.schema.own import SCHEMA
from toolkit.timestamps import shown

DEFAULT_WATCH_S = 2.0
WATCH_S = params.Seconds(3600, "an hour: refreshing less often is a job for cron", low=0.1)
FRAMES = params.Whole(1, params.PG_INT_MAX, "more refreshes than a watch lasts")


def watch_options(func: Callable[..., None]) -> Callable[..., None]:
    """``status --watch [SECONDS]`` and ``--count N``."""
    func = click.option("--count", "frames", type=FRAMES, default=None, metavar="N",
                        help="With --watch: stop after N showings (the first included).")(func)
    return click.option("--watch", "watch_s", type=WATCH_S, is_flag=False,
                        flag_value=DEFAULT_WATCH_S, default=None, metavar="[SECONDS]",
                        help="Then show the running run again every SECONDS (default "
                             f"{DEFAULT_WATCH_S:g}) until it ends, or Ctrl-C; with no run going, "
                             "say so and stop. With --json: one document a line, a line each "
                             "time.")(func)


def size_text(n: int | None) -> str:
    """Bytes for a person, in the toolkit's units (1 MB = 1048576 bytes, as --max-wal-rate)."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("kB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def per_row(wal: int, rows: int | None) -> str:
    """`` (123 B a row)``: what a changed row cost in WAL; empty when no row changed."""
    return f" ({size_text(round(wal / rows))} a row)" if rows else ""


def _duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else (f"{minutes}m{secs:02d}s" if minutes
                                                               else f"{secs}s")


def read_now(inspector: Inspector) -> dict[str, Any]:
    """The run going now (None when there is none), its pause and its hold, in one read-only
    snapshot of the toolkit's tables."""
    with inspector.read_only() as conn:
        run_id = progress.running_run_id(conn)
        live = progress.read(conn, run_id) if run_id is not None else None
        paused = steering.paused_now(conn)
        held = steering.held_now(conn)
    return {"run": live, "paused": paused, "held": held}


def as_json(now: dict[str, Any]) -> dict[str, Any]:
    live = now["run"]
    return {"run": live.as_dict() if live is not None else None,
            "paused": now["paused"] and {k: json_value(v) if hasattr(v, "isoformat") else v
                                         for k, v in now["paused"].items()},
            "held": now["held"] and {k: json_value(v) if hasattr(v, "isoformat") else v
                                     for k, v in now["held"].items()}}


def say_run(live: progress.LiveRun | None) -> None:
    """The running run's lines (nothing when no run is going: the caller says so if asked)."""
    if live is None:
        return
    elapsed = (live.now - live.started_at).total_seconds()
    phase = ""
    if live.phase is not None and live.phase_started_at is not None:
        phase = (f" ({live.phase} phase for "
                 f"{_duration((live.now - live.phase_started_at).total_seconds())})")
    out.say(f"run {live.run_id} is going{phase}: {live.command}, by {live.who}, started "
            f"{_duration(elapsed)} ago")
    if not live.tracked:
        out.say("  (it keeps no progress in the database: a command that runs no batches, or a "
                "toolkit from before revision 0011; see its terminal or --events)")
        return
    if live.pass_name is not None:
        total = live.keys_total or 0
        share = f" ({100 * min(live.keys_done / total, 1):.1f} %)" if total else ""
        resumed = f", resumed after key {live.pass_key_from}" if live.pass_key_from else ""
        line = (f"  pass {live.pass_name}: {live.keys_done} of {total} keys{share}{resumed}, "
                f"{live.pass_rows} rows changed in {live.batches} batches")
        if live.rate_keys_s is not None:
            line += f"; {live.rate_keys_s:.1f} keys/s ({live.rate_rows_s:.1f} rows/s)"
        if live.eta_s is not None:
            line += f"; about {_duration(live.eta_s)} left in this pass"
        out.say(line)
    if live.last_batch_at is not None:
        ago = (live.now - live.last_batch_at).total_seconds()
        out.say(f"  last batch: {_duration(ago)} ago, {live.last_batch_ms:.1f} ms, "
                f"{live.last_batch_keys} keys, {live.last_batch_rows} rows; the run so far: "
                f"{live.rows} rows, {size_text(live.wal_bytes)} of WAL")
    waited = ", ".join(f"{signal.replace('_', ' ')} {seconds:.1f} s"
                       for signal, seconds in sorted(live.throttled_seconds.items()))
    now_waiting = (f"; waiting now ({', '.join(s.replace('_', ' ') for s in live.throttled_by)}) "
                   f"for {_duration((live.now - live.throttled_since).total_seconds())}"
                   if live.throttled_since is not None else "")
    out.say(f"  throttled {100 * live.throttled_share:.1f} % of its time"
            + (f" ({waited})" if waited else "") + now_waiting)
    for c in live.controls:
        what = c["action"] + (f" {c['key']}={c['value']}" if c.get("key") else "")
        why = f": {c['reason']}" if c.get("reason") else ""
        out.say(f"  control: {what} by {steering.who(c)} at {shown(c['applied_at'])}{why}")


def _ended(inspector: Inspector, run_id: int) -> dict[str, Any] | None:
    with inspector.read_only() as conn:
        row = conn.execute(sa.text(f"SELECT outcome, finished_at, error FROM {SCHEMA}.runs "
                                   "WHERE id = :id"), {"id": run_id}).one_or_none()
    return dict(row._mapping) if row is not None else None


def watch(inspector: Inspector, every_s: float, frames: int | None, first: dict[str, Any]) -> None:
    """Refresh every ``every_s`` seconds until the run ends, ``frames`` refreshes were shown
    (the first, which the caller showed, counts), or Ctrl-C. With no run going the first
    frame says so and that is all. ``--json``: one document a line, a frame each."""
    json_mode = app().json_mode
    watched = first["run"].run_id if first["run"] is not None else None
    shown_frames = 1
    if watched is None:
        if not json_mode:
            out.say("No run is going.")
        return
    try:
        while frames is None or shown_frames < frames:
            time.sleep(every_s)
            now = read_now(inspector)
            shown_frames += 1
            still = now["run"] is not None and now["run"].run_id == watched
            ended = None if still else _ended(inspector, watched)
            if json_mode:
                result = {**as_json(now), "frame": shown_frames,
                          "ended": ended and {k: json_value(v) if hasattr(v, "isoformat") else v
                                              for k, v in ended.items()}}
                _json_line(result)
            else:
                _text_frame(now)
                if ended is not None:
                    error = f": {ended['error']}" if ended.get("error") else ""
                    out.say(f"run {watched} ended: {ended['outcome'].replace('_', ' ')}{error}")
                elif not still:
                    out.say(f"run {watched} is no longer going")
            if not still:
                return
    except KeyboardInterrupt:  # how a person ends a watch: not an error, nothing to resume
        return


def _text_frame(now: dict[str, Any]) -> None:
    if sys.stdout.isatty():
        click.clear()
    out.say()
    out.say(f"-- {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC --")
    say_run(now["run"])
    say_pause_and_hold(now)


def say_pause_and_hold(now: dict[str, Any]) -> None:
    held, paused = now["held"], now["paused"]
    if held is not None:
        out.say(f"held before drop since {held['applied_at'].isoformat(timespec='seconds')} "
                f"(run {held['applied_by']}); `toolkit control unpostpone` goes on")
    if paused is not None:
        why = f": {paused['reason']}" if paused["reason"] else ""
        out.say(f"run {paused['applied_by']} is paused by {steering.who(paused)} since "
                f"{paused['applied_at'].isoformat(timespec='seconds')}{why}; "
                "`toolkit control resume` goes on")


def _json_line(result: dict[str, Any]) -> None:
    """One frame of ``--watch --json``: a whole envelope on one line, so a reader takes the
    stream line by line."""
    doc = envelope("status", True, 0, database=app().database(), result=result)
    out.json_line(json.dumps(doc, sort_keys=True, default=json_value))


def json_first(result: dict[str, Any]) -> None:
    _json_line({**result, "frame": 1, "ended": None})
