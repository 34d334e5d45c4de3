"""The import order of the project: entry points > training/, coding/ > measure/ > the user's
three named modules > modules/ > utils/. Imports only go down (or stay inside one folder), and
nothing imports in a circle, lazy imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("training", "coding", "measure", "modules", "utils")
NAMED = ("model", "pairwise_losses", "paired_channel_dataset")
# Lower rank = higher floor. training/ and coding/ share a floor and do not import each other.
RANK = {"entry": 0, "training": 1, "coding": 1, "measure": 2, "named": 3, "modules": 4, "utils": 5}


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every source module outside tests/, bench/ and scripts/."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in FOLDERS:
        found.update({f"{folder}.{p.stem}": p for p in (ROOT / folder).glob("*.py")
                      if p.stem != "__init__"})
    return found


def floor_of(name: str) -> str:
    head = name.split(".")[0]
    if head in FOLDERS:
        return head
    return "named" if head in NAMED else "entry"


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in known)
    return found


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def arrows_against_the_order(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in graph.items():
        for target in targets:
            here, there = floor_of(name), floor_of(target)
            if here == there and here != "entry":
                continue  # inside one folder (or among the three named modules): see circles
            if RANK[there] <= RANK[here]:
                bad.append(f"{name} ({here}) imports {target} ({there})")
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_every_import_goes_down_the_floors():
    graph = import_graph()
    assert len(graph) > 30 and any(graph.values())  # the walk found the project
    assert arrows_against_the_order(graph) == []


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_checks_see_a_wrong_arrow_and_a_circle():
    graph = {"utils.checks": {"model"}, "model": {"modules.seanet"}, "modules.seanet": set(),
             "training.step": {"coding.shared_content"}, "coding.shared_content": set(),
             "training.a": {"training.b"}, "training.b": {"training.a"}}
    assert arrows_against_the_order(graph) == [
        "training.step (training) imports coding.shared_content (coding)",
        "utils.checks (utils) imports model (named)"]
    assert circles(graph) == [["training.a", "training.b", "training.a"]]
