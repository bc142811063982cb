"""The toolkit's floors: every import points down, no import loops, no hidden crossings.

The import graph is drawn from the source itself (``ast``, every ``import`` and
``from … import`` of the ``toolkit`` package: at module level, under ``if TYPE_CHECKING``,
and inside functions), so a change that makes a lower floor reach up, or two modules
import each other, fails here with the offending import named (file, line, statement).

A *unit* is a sub-package (``engine``, ``verify``, …) or a top-level module (``db``,
``errors``, …). Units sit on the floors of :data:`FLOORS`; a unit may import units on its
own floor or below, never above; no two modules, and no two units, import each other
(directly or round a loop); and an import inside a function stays within its own unit
(one that reaches another unit is a layer crossing, and belongs at the top of the module
where it can be seen).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

import toolkit

PACKAGE = Path(toolkit.__file__).parent

FLOORS: tuple[tuple[str, ...], ...] = (
    ("cli", "__main__"),
    ("fleet", "sandbox"),
    ("mlflow_api", "report", "output"),
    ("milestones",),
    ("engine",),
    ("verify",),
    ("db", "db_errors", "gitlab_config"),
    ("schema", "artifact_uri", "conninfo", "pooling", "cancel", "catalog", "inventory", "names",
     "words", "timestamps", "progress"),
    ("errors", "toolkit"),
)
"""The floors, top first. Why this order (each floor uses only those below it):

* ``cli``: the commands. The only floor that prints, and the one that decides policy
  (which database a command uses, falling back to the sandbox; which milestones exist).
* ``fleet`` runs the commands on many databases; ``sandbox`` builds a GitLab-shaped
  database and drives the MLflow API against it (app writes, training): tools the CLI
  offers, above everything they put to work.
* ``mlflow_api`` serves MLflow's REST API from GitLab's tables before, during and after
  the milestones, so it reads what the milestones define (slugs, the models milestone 3
  creates); ``report`` (the candidate comparison table) reads the milestones' plan;
  ``output`` renders the engine's events for a terminal.
* ``milestones``: what each milestone changes, as steps and actions the engine runs.
* ``engine``: how a change runs (batches, the lease, checkpoints, history, throttling),
  for any milestone: it is handed the milestones and never imports them.
* ``verify``: the fingerprint and the digests the engine records and compares; pure
  reads of GitLab's tables that know nothing of runs.
* ``db``: the connection layer (URL, engine, timeouts); ``db_errors`` says what the
  server's errors mean; ``gitlab_config`` reads GitLab's database.yml into a URL. Nothing
  here knows about runs or the sandbox (the fallback to it is the CLI's decision).
* ``schema`` (GitLab's table declarations and the toolkit's own schema), ``artifact_uri``
  (GitLab's rule, read by the milestones, the fingerprint and the MLflow API alike),
  ``pooling`` (the pooler's refusal, which the error layer names), and the small shared
  helpers; ``errors`` and the package root (its version) at the very bottom.
"""


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported module, dotted
    path: str  # as shown: toolkit/engine/batches.py
    line: int
    text: str
    local: bool  # inside a function

    def __str__(self) -> str:
        where = "function-local " if self.local else ""
        return f"{self.path}:{self.line}: {where}`{self.text}`"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(found: dict[str, Path]) -> list[Import]:
    """Every import of a ``toolkit`` module by a ``toolkit`` module, as written."""
    edges = []
    for module, path in found.items():
        source = path.read_text()
        tree = ast.parse(source, str(path))
        shown = str(path.relative_to(path.parents[len(module.split(".")) - (path.name != "__init__.py")]))
        local = {id(node) for function in ast.walk(tree)
                 if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                 for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            text = ast.get_source_segment(source, node) or ""
            for target in _targets(module, path, node, found):
                edges.append(Import(module, target, shown, node.lineno, " ".join(text.split()),
                                    id(node) in local))
    return edges


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom,
             found: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            here = here[:len(here) - node.level + 1]
            base = ".".join(here + ([node.module] if node.module else []))
        # ``from toolkit.engine import state`` imports the module toolkit.engine.state
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in found else base
                 for alias in node.names]
    return [name for name in dict.fromkeys(names) if name.split(".")[0] == PACKAGE.name]


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def floor_of(name: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if name in floor)


def upward(edges: list[Import]) -> list[str]:
    return [f"{edge}: {unit(edge.source)} (floor {floor_of(unit(edge.source)) + 1}) imports "
            f"{unit(edge.target)} (floor {floor_of(unit(edge.target)) + 1}), which is above it"
            for edge in edges if floor_of(unit(edge.target)) < floor_of(unit(edge.source))]


def loops(edges: list[Import], key=lambda module: module) -> list[list[Import]]:
    """Every strongly connected group of more than one node (modules, or units with
    ``key=unit``), each told as one loop through it: the imports that close it."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for edge in edges:
        if key(edge.source) != key(edge.target):
            graph[key(edge.source)].setdefault(key(edge.target), edge)
    found = []
    for group in _strongly_connected(graph):
        if len(group) > 1:
            found.append(_one_loop(graph, group))
    return found


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _one_loop(graph: dict[str, dict[str, Import]], group: set[str]) -> list[Import]:
    """A shortest path from the group's first node back to itself, within the group."""
    start = min(group)
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt, edge in sorted(graph[node].items()):
            if nxt == start:
                return paths[node] + [edge]
            if nxt in group and nxt not in paths:
                paths[nxt] = paths[node] + [edge]
                queue.append(nxt)
    raise AssertionError("a strongly connected group has a loop")


def local_crossings(edges: list[Import]) -> list[str]:
    return [f"{edge}: reaches from {unit(edge.source)} into {unit(edge.target)}; import it at "
            "the top of the module" for edge in edges if edge.local and unit(edge.source) != unit(edge.target)]


def told(loop: list[Import], key=lambda module: module) -> str:
    return " → ".join([key(loop[0].source), *(key(edge.target) for edge in loop)]) + "\n    " + \
        "\n    ".join(str(edge) for edge in loop)


EDGES = imports(modules())


def test_every_unit_has_a_floor():
    """A new sub-package or top-level module is given its place before anything else."""
    units = {unit(module) for module in modules()}
    placed = {name for floor in FLOORS for name in floor}
    assert not units - placed, f"units on no floor (add them to FLOORS): {sorted(units - placed)}"
    assert not placed - units, f"FLOORS names units that do not exist: {sorted(placed - units)}"


def test_no_import_reaches_up():
    found = upward(EDGES)
    assert not found, "imports that reach up a floor:\n" + "\n".join(found)


def test_no_import_loop_between_modules():
    found = loops(EDGES)
    assert not found, "import loops:\n" + "\n".join(told(loop) for loop in found)


def test_no_import_loop_between_units():
    found = loops(EDGES, key=unit)
    assert not found, "units that import each other:\n" + "\n".join(told(loop, unit) for loop in found)


def test_no_function_local_import_crosses_a_unit():
    found = local_crossings(EDGES)
    assert not found, "function-local imports that cross into another unit:\n" + "\n".join(found)


@pytest.fixture
def made_up(tmp_path: Path) -> dict[str, Path]:
    """A small package with one of each fault the checks above look for."""
    root = tmp_path / PACKAGE.name
    files = {
        "__init__.py": "",
        "db.py": "from toolkit.engine import runner\n",  # up: db is below engine
        "engine/__init__.py": "",
        "engine/actions.py": "from toolkit.engine.batches import run_pass\n",
        "engine/batches.py": "from toolkit.engine import step\nimport toolkit.db\n",
        "engine/step.py": ("from typing import TYPE_CHECKING\n"
                           "if TYPE_CHECKING:\n    from toolkit.engine.actions import Action\n"),
        "engine/runner.py": "def run():\n    from toolkit import errors\n",
        "errors.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return modules(root)


def test_the_checks_find_what_they_look_for(made_up):
    """Each check above, on a made-up package with one fault of each kind, names it."""
    edges = imports(made_up)
    assert [str(e).split(": ", 1)[1] for e in edges if e.source == "toolkit.db"] == [
        "`from toolkit.engine import runner`"]
    assert len(upward(edges)) == 1 and "db (floor 7) imports engine (floor 5)" in upward(edges)[0]
    [loop] = loops(edges)
    assert [edge.source for edge in loop] == ["toolkit.engine.actions", "toolkit.engine.batches",
                                              "toolkit.engine.step"]
    assert "toolkit.engine.actions → toolkit.engine.batches → toolkit.engine.step → " \
           "toolkit.engine.actions" in told(loop)
    [units_loop] = loops(edges, key=unit)
    assert {unit(edge.source) for edge in units_loop} == {"db", "engine"}
    [crossing] = local_crossings(edges)
    assert "engine/runner.py:2: function-local `from toolkit import errors`" in crossing
