"""Import map of the package: which module imports which, counting imports inside functions.

Run from the repository root::

    $ python scripts/import_map.py            # the house: folders, files, lines, imports
    $ python scripts/import_map.py --check    # exit 1 on a broken contract, saying which

Contracts (checked by ``tests/test_architecture.py`` as well):

1. No import circle, counting imports written inside functions (a strongly connected
   component of more than one module).
2. ``passes/`` is the ground floor: it imports nothing from ``amp_compiler`` but ``errors``.
3. Rooms import downwards only (``LAYERS``): a module never imports a room above its own.
4. No file over ``MAX_LINES`` lines, except those in ``LONG_FILES`` with the reason.

Imports of the package itself (``import amp_compiler`` for ``ac.convert``) count as imports of
the compiler's core.

Implicit imports of parent packages (importing ``amp_compiler.passes.plan`` runs
``amp_compiler/__init__``) are not edges: no tool can avoid them and they never run a module's
body before the module asked for is ready.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
# installed name -> folder in the repository (pyproject's package-dir)
PACKAGES = {"amp_compiler": "amp_compiler", "amp_compiler.passes": "passes",
            "amp_compiler.models": "models"}
MAX_LINES = 500
# files allowed over MAX_LINES, and why
LONG_FILES: dict[str, str] = {}
# rooms from the ground up; a module imports from its own room or one below it. A module belongs
# to the longest entry naming it or a package above it: the top-level modules not named here are
# the compiler's core ("amp_compiler": convert, module, scaler, dynamo, ...).
LAYERS: list[tuple[str, ...]] = [
    ("amp_compiler.errors",),
    ("amp_compiler.passes", "amp_compiler.models"),
    ("amp_compiler.capture", "amp_compiler.view"),
    ("amp_compiler",),
    ("amp_compiler.onnx",),
    ("amp_compiler.saving", "amp_compiler.loading", "amp_compiler.demo", "amp_compiler.targets",
     "amp_compiler.calibration_files", "amp_compiler.outputs"),
    ("amp_compiler.bench",),
    ("amp_compiler.commands", "amp_compiler.cli", "amp_compiler.__main__"),
]
GROUND_EXCEPTIONS = ("amp_compiler.errors",)


@dataclass
class Module:
    name: str
    path: Path      # relative to the repository root
    lines: int
    imports: dict[str, bool] = field(default_factory=dict)  # target -> inside a function only


def _module_name(pkg: str, root: Path, path: Path) -> str:
    parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
    return ".".join([pkg, *parts])


def collect(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the package with its lines and the package modules it imports."""
    modules: dict[str, Module] = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            name = _module_name(pkg, root / folder, path)
            modules[name] = Module(name, path.relative_to(root), len(path.read_text().splitlines()))
    for mod in modules.values():
        is_pkg = mod.path.name == "__init__.py"
        tree = ast.parse((root / mod.path).read_text())
        for node, in_function in _imports(tree):
            for target in _targets(node, mod.name, is_pkg, modules):
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != mod.name:
                    mod.imports[target] = mod.imports.get(target, True) and in_function
    return modules


def _imports(tree: ast.AST, in_function: bool = False):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(node, inner)


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool, modules) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = name.split(".") if is_pkg else name.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from pkg import sub` imports the submodule; `from mod import name` the module
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def graph(modules: dict[str, Module]) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for mod in modules.values():
        for target, in_function in mod.imports.items():
            g.add_edge(mod.name, target, in_function=in_function)
    return g


def problems(modules: dict[str, Module]) -> list[str]:
    """Every broken contract, one line each (empty: the house is in order)."""
    g = graph(modules)
    out = []
    for scc in nx.strongly_connected_components(g):
        if len(scc) > 1:
            cycle = nx.find_cycle(g.subgraph(scc))
            out.append("import circle: " + " -> ".join(a for a, _ in cycle) + f" -> {cycle[0][0]}")
    for a, b in g.edges:
        if a.startswith("amp_compiler.passes") and not b.startswith("amp_compiler.passes") \
                and b not in GROUND_EXCEPTIONS:
            out.append(f"passes/ is the ground floor: {a} imports {b}")
    level = {r: i for i, rooms in enumerate(LAYERS) for r in rooms}
    for a, b in g.edges:
        la, lb = level.get(_layer_key(a)), level.get(_layer_key(b))
        if la is not None and lb is not None and lb > la:
            out.append(f"upward import: {a} ({_layer_key(a)}) imports {b} ({_layer_key(b)})")
    for mod in modules.values():
        rel = mod.path.as_posix()
        if mod.lines > MAX_LINES and rel not in LONG_FILES:
            out.append(f"{rel}: {mod.lines} lines (over {MAX_LINES}; split it or say why in LONG_FILES)")
    return out


def _layer_key(name: str) -> str:
    """The LAYERS entry a module belongs to: the longest entry that is it or a package above it."""
    keys = [k for rooms in LAYERS for k in rooms if name == k or name.startswith(k + ".")]
    return max(keys, key=len) if keys else name


def house(modules: dict[str, Module]) -> list[tuple[str, int, int, int, int]]:
    """Rows (folder, files, lines, imports at module level, imports inside functions)."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for mod in modules.values():
        folder = mod.path.parent.as_posix()
        row = rows[folder]
        row[0] += 1
        row[1] += mod.lines
        row[2] += sum(not f for f in mod.imports.values())
        row[3] += sum(f for f in mod.imports.values())
    return [(k, *v) for k, v in sorted(rows.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a contract is broken")
    args = parser.parse_args(argv)
    modules = collect()
    print(f"{'folder':<28}{'files':>6}{'lines':>8}{'imports':>9}{'in functions':>14}")
    for folder, files, lines, top, inner in house(modules):
        print(f"{folder:<28}{files:>6}{lines:>8}{top:>9}{inner:>14}")
    g = graph(modules)
    print(f"modules {len(modules)}, import edges {g.number_of_edges()}, "
          f"circles {sum(len(c) > 1 for c in nx.strongly_connected_components(g))}, "
          f"files over {MAX_LINES} lines {sum(m.lines > MAX_LINES for m in modules.values())}")
    found = problems(modules)
    for line in found:
        print(line)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
