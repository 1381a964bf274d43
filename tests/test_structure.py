"""The layers of the code: what the root holds, who imports whom,
and that no argparse Namespace reaches the library.

Nodes of the import graph: the root's modules, the packages CLIP/ and dataset/ (one node each), and every
module of mvfa/ and tools/ (tools/bench/ included).
Depth counts the nodes of the longest chain, the ground floor included.
"""

import ast
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO

from mvfa.flags import one_line_errors
from utils import BadValue, MissingFile

SCRIPTS = {"train_few", "train_zero", "test_few", "test_zero"}
# the card's, and demo.py: the README's first command
ROOT_MODULES = SCRIPTS | {"loss", "prompt", "utils", "demo"}
ROOT_FOLDERS = {"CLIP", "dataset", "ckpt", "data", "tests", "mvfa", "tools", "docs", ".ci"}
PACKAGES = {"CLIP", "dataset"}
LIBRARY_ROOTS = ("CLIP", "dataset", "mvfa", "loss.py", "prompt.py", "utils.py")


def tracked_root_entries() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {line.split("/")[0] for line in listed.splitlines()}


def product_files() -> dict[str, list[Path]]:
    """node -> its files."""
    nodes = {p.stem: [p] for p in REPO.glob("*.py")}
    nodes.update({name: sorted((REPO / name).glob("*.py")) for name in PACKAGES})
    for package in ("mvfa", "tools", "tools/bench"):
        dotted = package.replace("/", ".")
        nodes.update(
            {f"{dotted}.{p.stem}": [p] for p in (REPO / package).glob("*.py") if p.stem != "__init__"}
        )
    return nodes


def imported_nodes(files: list[Path], nodes: set[str]) -> set[str]:
    """The nodes these files import: `import a.b`, `from a.b import c` (c may be a module), relative imports
    in mvfa/ and tools/ resolved; relative imports inside CLIP/ and dataset/ stay inside their node."""
    found = set()
    for path in files:
        package = path.parent.relative_to(REPO).as_posix().replace("/", ".")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    module = f"{base}.{module}".strip(".")
                names = [module, *(f"{module}.{a.name}" for a in node.names)]
            for name in names:
                parts = name.split(".")
                candidates = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
                found |= {c for c in candidates & nodes if c not in ("mvfa", "tools", "tools.bench")}
    return found


@cache
def graph() -> dict[str, frozenset[str]]:
    nodes = product_files()
    return {name: frozenset(imported_nodes(files, set(nodes)) - {name}) for name, files in nodes.items()}


def is_library(node: str) -> bool:
    return node in PACKAGES or node.startswith("mvfa.") or node in {"loss", "prompt", "utils"}


def test_root_holds_the_card_the_method_package_tools_and_docs():
    entries = tracked_root_entries()
    modules = {e.removesuffix(".py") for e in entries if e.endswith(".py")}
    folders = {e for e in entries if (REPO / e).is_dir()}
    assert modules <= ROOT_MODULES, f"modules at the root beyond the card's: {sorted(modules - ROOT_MODULES)}"
    assert folders <= ROOT_FOLDERS, f"folders at the root beyond the layout: {sorted(folders - ROOT_FOLDERS)}"
    assert {"CLIP", "dataset", "mvfa", "tools", "tests"} <= folders and modules >= SCRIPTS


def test_command_lines_import_no_command_line():
    edges = graph()
    drivers = {n for n in edges if n.startswith("tools.")} | {"demo"}
    offending = {
        n: sorted(deps & (SCRIPTS | drivers)) for n, deps in edges.items() if n in SCRIPTS or is_library(n)
    }
    assert {n: deps for n, deps in offending.items() if deps} == {}
    assert {n: sorted(deps & SCRIPTS) for n, deps in edges.items() if n in drivers and deps & SCRIPTS} == {}


def package_graph() -> dict[str, set[str]]:
    """The import graph with a package as one node (mvfa/ and tools/ too)."""
    edges = {}
    for name, deps in graph().items():
        top = name.split(".")[0]
        edges.setdefault(top, set()).update(d.split(".")[0] for d in deps)
    return {name: deps - {name} for name, deps in edges.items()}


def floors(edges) -> dict[str, int]:
    """Each node's floor (the ground is 1), asserting on the way that no chain of imports comes back."""

    @cache
    def depth(name: str, path: tuple = ()) -> int:
        assert name not in path, f"import loop: {' -> '.join((*path, name))}"
        return 1 + max((depth(d, (*path, name)) for d in edges[name]), default=0)

    return {name: depth(name) for name in edges}


def test_no_import_loop_between_modules():
    assert floors(graph())


def test_no_loop_between_packages_and_five_floors_at_most():
    """A package counts as one node: a root module the package imports never imports the package back, and
    the floors are utils.py (the project's error type, which every layer raises), CLIP/ and dataset/, loss.py
    and prompt.py, mvfa/, the commands."""
    edges = package_graph()
    floor = floors(edges)
    assert max(floor.values()) <= 5, floor
    assert edges["utils"] == set() and floor["CLIP"] == floor["dataset"] == 2
    assert floor["loss"] == floor["prompt"] == 3 and floor["mvfa"] == 4


def test_one_line_errors_turns_only_the_project_error_into_one_line(capsys):
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        raise BadValue("--shot 0: must be at least 1", flag="shot")
    assert stopped.value.code == 2 and capsys.readouterr().err == "error: --shot 0: must be at least 1\n"
    with pytest.raises(SystemExit), one_line_errors():
        raise MissingFile("support list x.txt not found", flag="seed_dir")
    assert capsys.readouterr().err == "error: --seed_dir: support list x.txt not found\n"
    for bug in (ValueError("a bug"), FileNotFoundError("a bug"), KeyError("a bug")):
        with pytest.raises(type(bug)), one_line_errors():
            raise bug
    assert capsys.readouterr().err == ""


# (file, token) -> why a library message may say `--token`: the fix can only be a training script's switch
FLAGS_IN_MESSAGES = {
    ("mvfa/resume.py", "--resume"): "a training state is read only for train_*.py --resume: the ways out of "
    "a state that cannot be continued are to continue it or to run without that switch",
    ("mvfa/resume.py", "--overwrite"): "a checkpoint beside an unfinished run's state is replaced only when "
    "train_*.py is told --overwrite",
    (
        "mvfa/resume.py",
        "--{}",
    ): "a state of another run is told by the flags that differ, to rerun its command",
    ("mvfa/records.py", "--overwrite"): "check_writable serves train_*.py alone, whose switch to replace a "
    "checkpoint is --overwrite",
    ("mvfa/training.py", "--resume"): "a training stopped by a signal goes on when its command is rerun with "
    "--resume",
}


def message_texts(call: ast.Call, assigned: dict[str, list[ast.AST]]) -> list[str]:
    """The strings in a raise's message (an f-string's fields as `{}`), and in the values assigned to the
    names the message uses (a hint kept in a constant or a local variable)."""
    texts, seen, parts, todo = [], set(), set(), list(call.args)
    while todo:
        for node in ast.walk(todo.pop()):
            if isinstance(node, ast.JoinedStr):
                texts.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
                parts |= {id(v) for v in node.values}
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
                texts.append(node.value)
            elif isinstance(node, ast.Name) and node.id not in seen:
                seen.add(node.id)
                todo += assigned.get(node.id, [])
    return texts


def test_library_messages_name_no_command_line_flag():
    """A check in the library names the value at fault and the fix in its own terms and passes `flag=`: the
    command line adds `--flag` (one_line_errors). A command quoted whole in backticks (`python -m
    tools.download --check`) keeps its flags; the justified others are in FLAGS_IN_MESSAGES."""
    found, used, raises = [], set(), 0
    for path in library_files():
        tree = ast.parse(path.read_text(), str(path))
        assigned = {}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                assigned.setdefault(node.targets[0].id, []).append(node.value)
        for node in ast.walk(tree):
            call = node.exc if isinstance(node, ast.Raise) else None
            if not isinstance(call, ast.Call):  # `raise`, `raise e`: no message written here
                continue
            raises += 1
            where = path.relative_to(REPO).as_posix()
            for text in message_texts(call, assigned):
                for token in re.findall(r"--(?:[A-Za-z]\w*|\{\})", re.sub(r"`[^`]*`", "", text)):
                    if (where, token) in FLAGS_IN_MESSAGES:
                        used.add((where, token))
                    else:
                        found.append(f"{where}:{node.lineno} {token} in {text!r}")
    assert raises > 40  # the walk sees the checks
    assert found == []
    assert used == set(FLAGS_IN_MESSAGES)  # no stale exception


# the library functions allowed to take the command line's values: where the configs are built from them, and
# where the run record keeps them
TAKE_FLAGS = {("mvfa/config.py", "configs"), ("mvfa/config.py", "pick"), ("mvfa/records.py", "write_record")}


def test_no_library_function_takes_the_flag_dict():
    """Only the configs are built from the flags, and the run record keeps them (a training run's from
    RunConfig.arguments): no other library function takes them."""
    found = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = {a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs}
                where = (path.relative_to(REPO).as_posix(), node.name)
                if "flags" in params and where not in TAKE_FLAGS:
                    found.append(f"{where[0]}:{node.lineno} {node.name}")
    assert found == []


def library_files() -> list[Path]:
    files = []
    for root in LIBRARY_ROOTS:
        path = REPO / root
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_no_namespace_in_the_library():
    """No parameter named `args` and no attribute read off a name `args` under CLIP/, dataset/, mvfa/ and the
    card's library modules: they take configs or plain values."""
    found = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                found += [f"{path.name}:{node.lineno} parameter args" for a in params if a.arg == "args"]
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "args"
            ):
                found.append(f"{path.name}:{node.lineno} args.{node.attr}")
    assert found == []


def test_no_lambda_assigned_to_a_name_and_no_catch_all_keywords():
    found = []
    product = library_files() + sorted(REPO.glob("*.py")) + sorted((REPO / "tools").rglob("*.py"))
    for path in product:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
                found.append(f"{path.name}:{node.lineno} lambda assigned")
            if isinstance(node, ast.FunctionDef) and node.args.kwarg and path in library_files():
                found.append(f"{path.name}:{node.lineno} **{node.args.kwarg.arg}")
    assert found == []
