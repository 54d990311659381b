"""The package's imports run one way: each module imports only from its own layer or the layers below it.

Every import counts, those inside functions included (a lazy import is still a dependency), and every module
of the package must be placed in a layer, so a new module is placed on purpose. Within a layer the imports
must not form a cycle either. The layers, lowest first, are the package's subpackages (the architecture the
README's layout describes).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# The subpackages, lowest first; the top-level modules are the foundation (below all) or the interface (above)
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"errors", "naming", "metrics", "text_metrics", "finite"}),
    ("tasks", {"tasks"}),
    ("config", {"config"}),
    ("core", {"core"}),
    ("store", {"store"}),
    ("train", {"train"}),
    ("ops", {"ops"}),
    ("serve", {"serve"}),
    ("interface", {"cli", "views", "__main__", ""}),  # "": the package's __init__
]
PACKAGE = REPO / "peftkit"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "peftkit" or node.module.startswith("peftkit.")):
                target = node.module.removeprefix("peftkit").lstrip(".")
            else:
                continue
            # `from . import x` imports module x; `from .x import y` imports x (and y, if it is a module)
            candidates = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            if node.module or node.level == 0:
                candidates.append(target)
            found.update(c for c in candidates if c in modules and c != name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("peftkit."):
                    target = alias.name.removeprefix("peftkit.")
                    if target in modules and target != name:
                        found.add(target)
    return found


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, (_, members) in enumerate(LAYERS) if top in members or module in members)


def test_every_module_has_a_layer():
    placed = [m for _, members in LAYERS for m in members]
    assert len(placed) == len(set(placed)), "a name is in two layers"
    tops = {m.split(".")[0] for m in _modules()}
    assert tops == set(placed), "a top-level module or subpackage is in no layer (or a layer names none)"


def test_imports_run_one_way_without_cycles():
    modules = _modules()
    layer_of = {m: _layer(m) for m in modules}
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    wrong = [f"{name or 'peftkit'} ({LAYERS[layer_of[name]][0]}) imports {target} ({LAYERS[layer_of[target]][0]})"
             for name, targets in sorted(graph.items()) for target in sorted(targets)
             if layer_of[target] > layer_of[name]]
    assert wrong == []
    # within a layer too: a cycle would make its modules one unit in all but name
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_check_sees_lazy_and_package_imports(tmp_path):
    """The check would catch what it exists for: an import inside a function, and `from . import x`."""
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py", "tasks": tmp_path / "tasks" / "__init__.py",
               "tasks.base": tmp_path / "tasks" / "base.py"}
    (tmp_path / "tasks").mkdir()
    modules["a"].write_text("def f():\n    from .b import g\n    from . import tasks\n")
    modules["tasks"].write_text("from .base import TaskHead\nfrom ..a import f\n")
    assert _imports("a", modules["a"], modules) == {"b", "tasks"}
    assert _imports("tasks", modules["tasks"], modules) == {"tasks.base", "a"}


def test_the_server_and_the_training_loop_name_no_task_head():
    """A head brings its own loss, metrics and serving hooks (tasks/base.py), so a new head is one file: the
    modules that train and serve never branch on a head's name."""
    from peftkit.tasks import task_types

    names = set(task_types())
    assert {"classification", "causal_lm"} <= names
    for module in ("serve/serving", "serve/served_adapter", "serve/predict_io", "train/training", "train/trainer",
                   "train/run_events"):
        source = (PACKAGE / f"{module}.py").read_text()
        named = sorted(n for n in names if f'"{n}"' in source or f"'{n}'" in source)
        assert named == [], f"{module}.py names the task head(s) {named}"
