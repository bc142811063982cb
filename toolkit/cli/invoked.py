"""The toolkit's command as the operator can type it again, for the commands we suggest.

After the Quick start (`.venv/bin/toolkit demo`, no venv activated), a bare `toolkit` is
"command not found": the suggestions must say `.venv/bin/toolkit`, as it was typed.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path


def typed_command(argv0: str | None = None,
                  which: Callable[[str], str | None] = shutil.which) -> str:
    """``toolkit`` when that is what the shell finds, else the path the program was run by
    (``.venv/bin/toolkit``), or ``python -m toolkit`` as it was run."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    path = Path(argv0)
    if path.name == "__main__.py" and path.parent.name == "toolkit":  # python -m toolkit
        python = sys.executable
        found = which(Path(python).name)
        shown = Path(python).name if found and Path(found).resolve() == Path(python).resolve() else python
        return f"{shown} -m toolkit"
    if path.name != "toolkit" or "/" not in argv0:
        return "toolkit"  # found on PATH, or not our script (the CLI embedded in a test)
    found = which("toolkit")
    if found and Path(found).resolve() == path.resolve():
        return "toolkit"
    return argv0
