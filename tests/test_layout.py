"""The package's shape, as a newcomer reads it: dependencies point one way (command line →
running a study → {sweep files, records, training core} → small utilities), no import
circles (imports inside functions counted, `TYPE_CHECKING` ones not), every private
Optuna name in one module, and the docs' Layout naming every module where it lives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "optimsweep"
# A module may import modules of its own package or of a lower layer, never a higher one.
LAYERS = {
    "optimsweep.util": 0,
    "optimsweep.errors": 1,
    "optimsweep.core": 2,
    "optimsweep.tasks": 3, "optimsweep.models": 3,  # the import strings sweep files may use
    "optimsweep.records": 3,
    "optimsweep.sweep": 4, "optimsweep.report": 4, "optimsweep.plots": 4,
    "optimsweep.run": 5,
    "optimsweep.confirm": 6, "optimsweep.export": 6, "optimsweep.services": 6,
    "optimsweep.slurm": 6, "optimsweep.local_slurm": 6,
    "optimsweep.cli": 7,
    "optimsweep.reference": 8,  # the docs' reference pages, written from the parsers
}
PRIVATE_OPTUNA = re.compile(r"\._storage\b|\._trial_id\b|\._study_id\b|\._contains\b|"
                            r"_get_stale_trial_ids|from optuna\.[\w.]*\._|\.stop = |"
                            r"\"fixed_params\"")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports, wherever in it, but for type checking."""
    found = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("optimsweep"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optimsweep"):
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                         else node.module for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & set(modules)


def _layer(module: str) -> tuple[str, int]:
    owner = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return owner, LAYERS[owner]


def test_every_module_has_a_layer():
    assert all(_layer(m) for m in _modules() if m != "optimsweep")


def test_dependencies_point_one_way():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        if module == "optimsweep":
            continue
        owner, layer = _layer(module)
        for imported in _imports(path, modules) - {"optimsweep"}:
            other, other_layer = _layer(imported)
            if other != owner and other_layer >= layer:
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_no_import_circles():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m, "optimsweep"} for m, p in modules.items()}
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):]
                                                                 + [module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            walk(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])


def test_private_optuna_names_live_in_the_adapter_alone():
    adapter = PACKAGE / "records" / "optuna_adapter.py"
    used = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}"
            for p in PACKAGE.rglob("*.py") if p != adapter
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if PRIVATE_OPTUNA.search(line)]
    assert used == []
    assert PRIVATE_OPTUNA.search(adapter.read_text())  # the pattern does find them


def test_the_import_strings_the_readme_gives_for_built_ins_resolve():
    from optimsweep.core.models import NeuralNetwork
    from optimsweep.core.tasks import fashion_mnist
    from optimsweep.core.usercode import resolve

    assert resolve("optimsweep.tasks:fashion_mnist") is fashion_mnist
    assert resolve("optimsweep.models:NeuralNetwork") is NeuralNetwork


def test_the_docs_layout_names_every_module_in_its_folder():
    page = (PACKAGE.parents[1] / "docs" / "development.md").read_text()
    layout = page.split("## Layout", 1)[1].split("```")[1]
    package = re.search(r"^src/optimsweep/\n((?:  .*\n)+)", layout, re.M).group(1)
    # each entry runs from its name to the next line that names another
    entries = re.split(r"\n(?=  [\w.]+/? )", package)
    folders = {e.split()[0].rstrip("/"): e for e in entries if e.split()[0].endswith("/")}
    top = " ".join(e for e in entries if not e.split()[0].endswith("/"))
    missing = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        folder = path.parent.relative_to(PACKAGE).as_posix()
        text = top if folder == "." else folders.get(folder, "")
        if not re.search(rf"(?<![\w/]){re.escape(path.name)}\b", text):
            missing.append(path.relative_to(PACKAGE).as_posix())
    assert missing == []
