"""``toolkit ARGS`` exactly as an operator runs it, for ``scripts/bench.py`` to time: the
real command line (click, the CLI's engine and options, its --json document), in a
process of its own, importing no more than the toolkit does.

    python scripts/bench_command.py OUT toolkit-args...

The one addition: the :class:`~toolkit.engine.runner.Runner`'s result is kept as it
returns, so that ``OUT`` gets each batch's duration (the --json document has per-pass
totals only) and the wall time of the run itself; everything else the process spends
(interpreter, imports, connecting, rendering, exit) is the parent's wall time minus it.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from toolkit.cli.main import main
from toolkit.engine.runner import Runner

TIMED_APART = ("fingerprint", "apply", "verify")
_kept: dict[str, Any] = {}
_migrate = Runner.migrate


def _keeping(self: Runner, *args: Any, **kwargs: Any) -> Any:
    started = time.perf_counter()
    _kept["run_began"] = started
    result = _migrate(self, *args, **kwargs)
    _kept["run_ended"] = time.perf_counter()
    _kept["runner_seconds"] = _kept["run_ended"] - started
    _kept["result"] = result
    return result


def run(out: str, argv: list[str]) -> None:
    Runner.migrate = _keeping  # type: ignore[method-assign]
    sys.argv = ["toolkit", *argv]
    code: int | str | None = 0
    # what the command says on stderr (with the writer running, the closing verify finds
    # the newest runs not yet migrated and says so): kept for the result, not the console
    said, sys.stderr = sys.stderr, io.StringIO()
    began = time.perf_counter()
    try:
        main()
    except SystemExit as exit_:  # click ends the process this way, whatever the outcome
        code = exit_.code
    ended = time.perf_counter()
    said, sys.stderr = sys.stderr, said
    result = _kept.get("result")
    doc: dict[str, Any] = {"exit_code": code, "stderr": said.getvalue()[-2000:]}
    if result is not None:
        timings = {name: round(took, 3) for name, took in result.timings.items()}
        runner = _kept["runner_seconds"]
        doc.update({
            "runner_seconds": round(runner, 3), "rows": result.rows,
            # the command line's own work around the run: reading the options, connecting,
            # the milestone's state (runner.inspector.final), and after it the report and --json document
            "cli_before_run": round(_kept["run_began"] - began, 3),
            "cli_after_run": round(ended - _kept["run_ended"], 3),
            "phases": {
                # the gate, the lease, the plan of the steps: all of the run that is not timed apart
                "preflight": round(runner - sum(timings.get(p, 0.0) for p in TIMED_APART), 3),
                **{p: timings[p] for p in ("fingerprint", "apply", "verify") if p in timings}},
            "verified": result.verify.ok if result.verify else None,
            "wal_bytes": sum(p.wal_bytes for p in result.passes),
            "timeline": [[p.name, round(s, 4), n] for p in result.passes
                         for s, n in zip(p.batch_seconds, p.batch_sizes, strict=True)]})
    Path(out).write_text(json.dumps(doc))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
