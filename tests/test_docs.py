"""The README and docs/ stay true to the code: every relative link (and its #anchor) resolves, every script and
`python -m` module they show exists, and the README's tables of the wings name exactly the files of each wing."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
WINGS = {"base": "gpt_moe", "model": "gpt_moe/model", "data": "gpt_moe/data", "checkpoint": "gpt_moe/checkpoint",
         "train": "gpt_moe/train", "serve": "gpt_moe/serve"}
README_MAX_LINES = 250


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code blocks
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_their_anchors_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_scripts_and_modules_shown_exist(page):
    text = page.read_text()
    missing = [script for script in re.findall(r"\blaunch/[\w]+\.py", text) if not (REPO / script).is_file()]
    missing += [f"bench.py {name}" for name in re.findall(r"\bbench\.py (\w+)", text)
                if not (REPO / "launch" / f"bench_{name}.py").is_file()]
    import gpt_moe  # noqa: F401 - the 0.1 module names resolve through its finder

    missing += [module for module in re.findall(r"python -m ([\w.]+)", text)
                if module != "pytest" and importlib.util.find_spec(module) is None]
    assert not missing, missing


def wing_tables() -> dict[str, set[str]]:
    """The README's tables under "The code": wing -> the file names in their first column."""
    section = (REPO / "README.md").read_text().split("## The code", 1)[1]
    tables: dict[str, set[str]] = {}
    for wing, body in re.findall(r"^\*\*(\w+)\*\* \(`[\w/]+`\)\n\n((?:\|.*\n)+)", section, flags=re.M):
        rows = body.splitlines()[2:]  # after the header and the rule
        tables[wing] = {name for row in rows for name in re.findall(r"`([\w.]+\.py)`", row.split("|")[1])}
    return tables


def test_the_readme_tables_name_exactly_the_files_of_each_wing():
    tables = wing_tables()
    assert set(tables) == set(WINGS), f"tables for {sorted(tables)}, expected {sorted(WINGS)}"
    for wing, folder in WINGS.items():
        files = {p.name for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"}
        assert tables[wing] == files, (wing, "missing", sorted(files - tables[wing]), "not there",
                                       sorted(tables[wing] - files))


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_the_readme_commands_run_as_shown_in_their_own_help():
    """The entry points the README names answer --help (cheap; the commands themselves are run by other tests)."""
    import subprocess

    for command in (["-m", "data_prep", "--help"], ["-m", "gpt_moe.model.params", "--help"], ["app.py", "--help"],
                    *[[f"launch/{name}.py", "--help"] for name in ("train", "sample", "eval", "export", "reshard")]):
        result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (command, result.stderr[-500:])
