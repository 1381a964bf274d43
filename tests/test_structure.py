"""The layers of the code: command lines import library modules only, and the import graph stays shallow.

Nodes are the top-level modules and the packages CLIP/ and dataset/ (a package is one node); an edge is an import of
one of them by another. Depth counts the nodes of the longest chain, the ground floor included.
"""
import ast
from functools import cache
from pathlib import Path

from conftest import REPO

SCRIPTS = {"train_few", "train_zero", "test_few", "test_zero", "predict", "paper_tables", "demo"}
PACKAGES = {"CLIP", "dataset"}


def product_files() -> dict[str, list[Path]]:
    """node -> its files: top-level modules, the two packages, and each bench/ script."""
    nodes = {p.stem: [p] for p in REPO.glob("*.py")}
    nodes.update({name: sorted((REPO / name).glob("*.py")) for name in PACKAGES})
    nodes.update({f"bench/{p.stem}": [p] for p in (REPO / "bench").glob("*.py")})
    return nodes


def imports(files: list[Path], nodes: set[str]) -> set[str]:
    """The nodes these files import (relative imports stay inside their package)."""
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            found |= {n.split(".")[0] for n in names} & nodes
    return found


def graph() -> dict[str, set[str]]:
    nodes = product_files()
    return {name: imports(files, set(nodes)) - {name} for name, files in nodes.items()}


def test_command_lines_import_no_command_line():
    edges = graph()
    offending = {name: sorted(deps & SCRIPTS) for name, deps in edges.items() if deps & SCRIPTS}
    assert offending == {}


def test_import_graph_at_most_five_floors():
    edges = graph()

    @cache
    def depth(name: str) -> int:
        return 1 + max((depth(d) for d in edges[name]), default=0)

    deepest = max(edges, key=depth)
    assert depth(deepest) <= 5, f"{deepest}: {depth(deepest)} floors"
    assert all(depth(name) == 1 for name in PACKAGES | {"utils", "metrics", "scoring"})  # the ground floor
