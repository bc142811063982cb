"""How a run ended, kept on this machine when the database could not take it.

A run records its end in ``toolkit.runs``. When the server cannot take that write (it is
down, crashed on a full ``pg_wal``, or read-only after a failover), the end would be lost:
the next run could only say ``stopped unrecorded``. So the run keeps it in a small file
here, one per database (named by a hash of the URL without its password), and the next
run on that database from this machine writes it on the abandoned run once it holds the
lease. A run still marked ``running`` is the only one it is written on, so a note about a
database restored since then, or one another run recorded already, changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import platformdirs
from sqlalchemy.engine import URL

STATE_DIR_ENV = "TOOLKIT_STATE_DIR"


def _directory() -> Path:
    given = os.environ.get(STATE_DIR_ENV)
    return Path(given) if given else platformdirs.user_state_path("toolkit") / "unrecorded"


def _file(url: URL, kind: str = "") -> Path:
    """One file per database (and kind of note), named by a hash of its URL, no password."""
    name = url.set(password=None).render_as_string(hide_password=True)
    return _directory() / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}{kind}.json"


def write_note(url: URL, kind: str, note: dict[str, Any]) -> None:
    """Another note about the database (rewind.py's committed batches); best effort."""
    path = _file(url, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(note))
        temporary.replace(path)
    except OSError:
        pass


def take_note(url: URL, kind: str) -> dict[str, Any] | None:
    path = _file(url, kind)
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    return note if isinstance(note, dict) else None


def keep(url: URL, run_id: int, outcome: str, rows: dict[str, int], error: str | None) -> bool:
    """Add a run's end to the database's file; False (and nothing kept) when this machine
    cannot write it either."""
    path = _file(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = _read(path)
        kept.append({"run_id": run_id, "outcome": outcome, "rows": rows, "error": error})
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(kept))
        temporary.replace(path)
        return True
    except OSError:
        return False


def take(url: URL) -> list[dict[str, Any]]:
    """The ends kept for this database, removed from the file (the caller writes them in the
    transaction that claims the lease; should that fail, it keeps them again)."""
    path = _file(url)
    kept = _read(path)
    if kept:
        with contextlib.suppress(OSError):
            path.unlink()
    return kept


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [entry for entry in found if isinstance(entry, dict) and isinstance(entry.get("run_id"), int)] \
        if isinstance(found, list) else []
