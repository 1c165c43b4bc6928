"""The shape the code keeps: no import cycles between modules, checkpoints apart from exports, short
functions, short lines. Read from the source (AST), so the rules hold for code no test executes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("gpt_moe", "data_prep")
MAX_FUNCTION_LINES = 60
MAX_LINE = 120


def modules() -> dict[str, Path]:
    return {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
            for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """Project modules imported when `path` is imported (imports inside functions are not followed)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks import nothing at run time
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: top_level_imports(path, known) - {name} for name, path in modules().items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_training_checkpoints_and_exports_do_not_import_each_other():
    """The training-checkpoint format sits below everything that reads checkpoints (loading, export)."""
    graph = import_graph()
    assert "gpt_moe.checkpoint" not in graph["gpt_moe.export"]
    assert not {"gpt_moe.export", "gpt_moe.loading"} & reachable(graph, "gpt_moe.checkpoint")
    assert not any(name.startswith("data_prep") for name in reachable(graph, "gpt_moe.trainer"))


def test_every_module_imports():
    """In a fresh interpreter (with the cycle test above, an import order that only works one way is caught)."""
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, *modules()], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("package", PACKAGES)
def test_functions_fit_on_a_screen(package):
    long = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_line_over_120_characters():
    files = [p for folder in (*PACKAGES, "launch", "tests") for p in sorted((REPO / folder).rglob("*.py"))]
    long = [f"{path.relative_to(REPO)}:{i}" for path in [*files, REPO / "app.py"]
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, long
