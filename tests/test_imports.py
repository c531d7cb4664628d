"""The package's import graph (docs/design.md §8): no cycles, the kernel floor (quietstar/ops/) imports nothing above
it, and the core imports nothing from training/, report/ or cli/.

Imports are read from the source with ast: module-level, function-level and ``if TYPE_CHECKING:`` ones alike, relative
ones resolved. Importing ``a.b.c`` also runs the ``__init__`` of the package ``a.b``, so an import is an edge to the
module it names and to every package above that module which the importer does not itself live in; the root package
(the public API, which every ``from quietstar.x import y`` runs first) is left out, or every module would depend on
every other. The same checks run on small planted packages, so they cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "quietstar"
FLOOR = "ops"  # quietstar/ops/: pure tensor rules and kernels, importing only each other, torch, triton, stdlib
FLOOR_MAY_IMPORT = ("torch", "triton", *sys.stdlib_module_names)
ABOVE_THE_CORE = ("training", "report", "cli")  # and the checkout folders, which are not importable from the package
CHECKOUT_FOLDERS = ("eval", "scripts", "bench")


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, whether it is a package's __init__) for every .py file of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules) -> list[str]:
    """The dotted names one import statement imports, relative ones resolved; ``from x import y`` names x.y when
    that is a module, else x."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the names it imports: modules of ``package`` (and the packages above them that an import runs), and
    outside names as written (``torch.nn``, ``os``)."""
    modules = _modules(root, package)
    graph = {}
    for module, (path, is_package) in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(module, is_package, node, modules):
                if name.split(".")[0] != package:
                    edges.add(name)
                    continue
                while name and name not in modules:  # an attribute of a module (a function, a class): the module
                    name = name.rpartition(".")[0]
                parts = name.split(".")
                edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1)
                             if i == len(parts) or not f"{module}.".startswith(".".join(parts[:i]) + "."))
        edges.discard(module)
        edges.discard(package)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [m0, m1, ..., m0], or None; only edges between the graph's own modules count."""
    state = {}  # module -> "open" while on the depth-first path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if target not in graph:
                continue
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def _inside(name: str, folder: str) -> bool:
    return name == folder or name.startswith(folder + ".")


def floor_violations(graph: dict[str, set[str]], package: str) -> list[tuple[str, str]]:
    """(module, imported name) for every import from ``package.ops`` into anything but ``package.ops`` and the
    outside names the floor may use."""
    floor = f"{package}.{FLOOR}"
    return sorted((module, name) for module, names in graph.items() if _inside(module, floor) for name in names
                  if not _inside(name, floor) and name.split(".")[0] not in FLOOR_MAY_IMPORT)


def core_violations(graph: dict[str, set[str]], package: str) -> list[tuple[str, str]]:
    """(module, imported name) for every import from the core (the package outside training/, report/, cli/) into
    those folders or the checkout's eval/, scripts/, bench/."""
    above = [f"{package}.{folder}" for folder in ABOVE_THE_CORE]
    forbidden = above + list(CHECKOUT_FOLDERS)
    return sorted((module, name) for module, names in graph.items()
                  if not any(_inside(module, folder) for folder in above)
                  for name in names if any(_inside(name, folder) for folder in forbidden))


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(REPO, PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_kernel_floor_imports_only_itself_torch_triton_and_the_standard_library():
    violations = floor_violations(import_graph(REPO, PACKAGE), PACKAGE)
    assert not violations, "quietstar/ops/ imports from above it: " + ", ".join(f"{m} -> {n}" for m, n in violations)


def test_the_core_imports_nothing_from_training_report_or_cli():
    violations = core_violations(import_graph(REPO, PACKAGE), PACKAGE)
    assert not violations, "the core imports upward: " + ", ".join(f"{m} -> {n}" for m, n in violations)


def test_each_sus_design_imports_only_the_shared_files_not_the_other_design():
    graph = import_graph(REPO, PACKAGE)
    sus = "quietstar.ops.sus."
    designs = {module: module[len(sus):].split("_")[1] for module in graph
               if module.startswith(sus + "design_")}  # design_a_kernels -> "a"
    assert set(designs.values()) == {"a", "c"}
    crossing = sorted((module, name) for module, design in designs.items() for name in graph[module]
                      if name in designs and designs[name] != design)
    assert not crossing, "one SUS design imports the other: " + ", ".join(f"{m} -> {n}" for m, n in crossing)


def test_the_graph_sees_the_imports_that_the_floor_rests_on():
    """The reader finds real edges of quietstar itself (relative, from-package and function-level imports)."""
    graph = import_graph(REPO, PACKAGE)
    assert "quietstar.ops.visibility" in graph["quietstar.attention.eager"]
    assert "quietstar.ops.sus.limits" in graph["quietstar.ops.sus.function"]
    assert "quietstar.ops.sus.design_a_launch" in graph["quietstar.ops.sus.function"]  # imported inside a function
    assert "quietstar.ops.sus" in graph["quietstar.attention.dispatch"]  # `from ..ops import sus`
    assert "triton" in graph["quietstar.ops.sus.design_a_kernels"]


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


CLEAN = {
    "pkg/__init__.py": "from .model import Model\n",
    "pkg/model.py": "from .attention import attend\nfrom .ops import kernel\nclass Model: ...\n",
    "pkg/attention/__init__.py": "from .dispatch import attend\n",
    "pkg/attention/dispatch.py": "import torch\nfrom ..ops import kernel\nfrom ..ops.rule import visible\ndef attend(): ...\n",
    "pkg/ops/__init__.py": "",
    "pkg/ops/rule.py": "import math\nimport torch\ndef visible(): ...\n",
    "pkg/ops/kernel.py": "from . import rule\ndef run():\n    import triton\n",
    "pkg/training/__init__.py": "from ..model import Model\n",
    "pkg/report/__init__.py": "",
    "pkg/report/card.py": "from ..training import Model\n",
}


def test_a_clean_package_passes_every_check(tmp_path):
    _write_package(tmp_path, CLEAN)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.ops.kernel"] == {"pkg.ops.rule", "triton"}
    assert find_cycle(graph) is None
    assert floor_violations(graph, "pkg") == [] and core_violations(graph, "pkg") == []


def test_a_planted_cycle_is_found_through_a_relative_import_in_a_function(tmp_path):
    _write_package(tmp_path, {**CLEAN, "pkg/ops/rule.py": "def visible():\n    from .kernel import run\n"})
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.ops.kernel", "pkg.ops.rule", "pkg.ops.kernel"]


def test_the_loop_through_a_package_init_is_found(tmp_path):
    """The loop this test was written for: ops imports attention/layout.py, whose package __init__ imports the
    dispatch, which imports ops. Neither module names the other; the package's __init__ closes the loop."""
    planted = {**CLEAN, "pkg/attention/layout.py": "def rule(): ...\n",
               "pkg/ops/kernel.py": "from ..attention.layout import rule\n"}
    _write_package(tmp_path, planted)
    graph = import_graph(tmp_path, "pkg")
    assert find_cycle(graph) == ["pkg.attention", "pkg.attention.dispatch", "pkg.ops.kernel", "pkg.attention"]
    assert floor_violations(graph, "pkg") == [("pkg.ops.kernel", "pkg.attention"),
                                              ("pkg.ops.kernel", "pkg.attention.layout")]


def test_planted_upward_imports_are_found(tmp_path):
    planted = {**CLEAN,
               "pkg/ops/rule.py": "import numpy\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from pkg.model import Model\n",
               "pkg/attention/dispatch.py": "from ..ops import kernel\ndef attend():\n"
                                           "    from ..report.card import write\n",
               "pkg/model.py": "import bench.step\nclass Model: ...\n"}
    _write_package(tmp_path, planted)
    graph = import_graph(tmp_path, "pkg")
    assert floor_violations(graph, "pkg") == [("pkg.ops.rule", "numpy"), ("pkg.ops.rule", "pkg.model")]
    assert core_violations(graph, "pkg") == [("pkg.attention.dispatch", "pkg.report"),
                                             ("pkg.attention.dispatch", "pkg.report.card"),
                                             ("pkg.model", "bench.step")]
