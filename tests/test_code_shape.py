"""The shape the code keeps, read from the source (AST) so that the rules hold for code no test executes: no import
cycle at any level (imports inside functions and type-only imports included), the wings' layering, a torch-free
`data_prep`, short functions, short lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("gpt_moe", "data_prep")
MAX_FUNCTION_LINES = 60
MAX_LINE = 120

WING_LEVEL = {"model": 1, "data": 2, "checkpoint": 3, "train": 4, "serve": 4}
"""gpt_moe's wings in import order: a module imports its own wing, the base (level 0: the modules directly in
gpt_moe/) and wings of a lower level; train and serve, both on top, never import each other."""

LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("gpt_moe.train.engine", "gpt_moe.train.expert_parallel"):
        "expert_parallel subclasses DeepSpeed's MoE layer, so importing it imports deepspeed.moe at module level; "
        "the engine module (which the benchmarks and the tests import) imports DeepSpeed only where it is used, and "
        "only a run with --ep-size > 1 builds expert-parallel experts",
}
"""Project imports kept inside a function, (importing module, imported module) -> why. Any other import of a project
module sits at the top of its module, where this test and a reader see it. Third-party imports (deepspeed, gradio,
tensorboard) are imported where they are used and are not listed."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    kind: str  # "module" (runs at import), "function" (runs when the function does), "typing" (never runs)


def modules() -> dict[str, Path]:
    found = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
             for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}
    found.update({f"launch.{path.stem}": path for path in sorted((REPO / "launch").glob("*.py"))})
    found["app"] = REPO / "app.py"
    return found


def _imported_names(node: ast.Import | ast.ImportFrom, known: set[str], source: str) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:  # relative imports are not used; refuse to guess
        raise AssertionError(f"{source}: relative import")
    if node.module is None:
        return set()
    names = {f"{node.module}.{alias.name}" for alias in node.names} & known  # `from gpt_moe.data import shards`
    return names or ({node.module} & known)


def edges_of(name: str, path: Path, known: set[str]) -> list[Edge]:
    """Every import of a project module in `path`, with where it runs."""
    tree = ast.parse(path.read_text())
    kinds: dict[int, str] = {}
    for statement in tree.body:
        kind = "typing" if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test) \
            else "module"
        for node in ast.walk(statement):
            kinds.setdefault(id(node), kind)
        for node in ast.walk(statement):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if kinds[id(inner)] == "module":
                        kinds[id(inner)] = "function"
    library = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return [Edge(name, target, kinds[id(node)]) for node in library
            for target in _imported_names(node, known, name) if target != name]


def all_edges() -> list[Edge]:
    found = modules()
    return [edge for name, path in found.items() for edge in edges_of(name, path, set(found))]


def reachable(edges: list[Edge], start: str, kinds: tuple[str, ...]) -> set[str]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.kind in kinds:
            graph.setdefault(edge.source, set()).add(edge.target)
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles_at_any_level():
    edges = all_edges()
    cycles = sorted(name for name in modules() if name in reachable(edges, name, ("module", "function", "typing")))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_project_imports_inside_functions_are_listed_with_a_reason():
    lazy = {(e.source, e.target) for e in all_edges()
            if e.kind == "function" and not e.source.startswith(("launch.", "app"))}
    assert not lazy - set(LAZY_IMPORTS), f"lazy project imports without a reason: {sorted(lazy - set(LAZY_IMPORTS))}"
    assert not set(LAZY_IMPORTS) - lazy, f"LAZY_IMPORTS entries no longer used: {sorted(set(LAZY_IMPORTS) - lazy)}"


def level(module: str) -> tuple[int, str]:
    """(level, wing) of a gpt_moe module: base modules are level 0."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in WING_LEVEL:
        return WING_LEVEL[parts[1]], parts[1]
    return 0, "base"


def test_wings_import_downwards_only():
    wrong = []
    for edge in all_edges():
        if not (edge.source.startswith("gpt_moe.") and edge.target.startswith("gpt_moe.")):
            continue
        (source_level, source_wing), (target_level, target_wing) = level(edge.source), level(edge.target)
        if target_level > source_level or (target_level == source_level and target_wing != source_wing):
            wrong.append(f"{edge.source} -> {edge.target} ({edge.kind})")
    assert not wrong, wrong


def test_model_wing_imports_nothing_above_it():
    """The model reads like the paper: no checkpoint, training or serving code inside it."""
    above = ("gpt_moe.train", "gpt_moe.checkpoint", "gpt_moe.serve", "gpt_moe.data")
    wrong = [edge for edge in all_edges() if edge.source.startswith("gpt_moe.model") and edge.target.startswith(above)]
    assert not wrong, wrong


def module_level_third_party(path: Path) -> set[str]:
    """Top-level names of the libraries a module imports when it is imported."""
    found = set()
    for statement in ast.parse(path.read_text()).body:
        if isinstance(statement, ast.Import):
            found |= {alias.name.split(".")[0] for alias in statement.names}
        elif isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
            found.add(statement.module.split(".")[0])
    return found


def test_data_prep_reaches_no_module_level_torch_import():
    """`python -m data_prep` starts without torch's import time: no module it imports imports torch at module level."""
    edges, found = all_edges(), modules()
    starts = [name for name in found if name.startswith("data_prep")]
    reached = set(starts).union(*(reachable(edges, name, ("module",)) for name in starts))
    heavy = {name for name in reached if {"torch", "deepspeed", "gradio"} & module_level_third_party(found[name])}
    assert not heavy, f"imported by data_prep and importing torch (or deepspeed, gradio) at module level: {heavy}"


def test_every_module_imports():
    """In a fresh interpreter (with the cycle test above, an import order that only works one way is caught)."""
    names = [name for name in modules() if not name.startswith(("launch.", "app"))]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, *names], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def code_files() -> list[Path]:
    return [p for folder in (*PACKAGES, "launch") for p in sorted((REPO / folder).rglob("*.py"))] + [REPO / "app.py"]


def test_functions_fit_on_a_screen():
    long = []
    for path in code_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


@pytest.mark.parametrize("folder", [*PACKAGES, "launch", "tests"])
def test_no_line_over_120_characters(folder):
    files = sorted((REPO / folder).rglob("*.py")) + ([REPO / "app.py"] if folder == "launch" else [])
    long = [f"{path.relative_to(REPO)}:{i}" for path in files
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, long
