"""Import direction: freezetune's modules form layers, and every import points down (or sideways).

The layers, lowest first (a module belongs to the layer of its longest matching prefix):

 0. errors, atomic, lock, the package ``__init__``: exception types, atomic file writes, the
    one-writer folder lock, ``__version__``.
 1. measure, models.catalog, models.timm_models, models.structure, models.download: plain torch
    facts (timing, memory, FLOPs) and the static model catalog, with the timm models it covers
    (timm_models is the one module with timm code), the family-agnostic module-tree helpers
    both stand on, and the download guard timm's weights share with torchvision's.
 2. config: the schema and YAML loading; it checks model names against the catalog (lazily).
 3. models (weights, listing): building a model and loading its weights, driven by the model
    config; the ``freezetune models`` listing. models/ spans layers 1 and 3 because config needs
    the catalog's name check while building a model needs config.
 4. freezing: every ``requires_grad`` decision, made on a built model.
 5. speed: how a frozen model runs fast (frozen prefix, feature cache, precision).
 6. training: the engine that puts model, freezing and speed together into a run (the recipe).
 7. render: text, tables and figures for people, made from result records (plain dicts).
 8. compare, inspection, demo, export, evaluation: features built on the recipe; compare draws through render.
 9. cli, __main__: the command line, the only place that knows about all the features.

Why: a module may only lean on what is below it, so each layer can be understood, tested and
reused without the ones above, and no import cycle can form. Imports are read with ``ast`` (no
module is imported), top level, inside functions and inside ``if TYPE_CHECKING:`` blocks alike: a
type-only import still ties the two modules together (a reader of one needs the other). A new
module must be given a layer here on purpose: the test fails for any that has none.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = "freezetune"

# Lowest first. Each entry is a list of module prefixes; "freezetune" itself means the package
# __init__ only (it holds __version__), never "everything in the package".
LAYERS: list[list[str]] = [
    ["freezetune.errors", "freezetune.atomic", "freezetune.lock", "freezetune.records", "freezetune"],  # 0: the base
    # 1: timing, memory, FLOPs; the static model catalog and its timm half, the generic module-tree
    # helpers under both, the download guard timm's weights use.
    ["freezetune.measure", "freezetune.models.catalog", "freezetune.models.timm_models",
     "freezetune.models.structure", "freezetune.models.download"],
    ["freezetune.config"],                                 # 2: schema + YAML; checks names against the catalog
    # 3: building a model and loading its weights (reads config.ModelConfig); the `models` listing.
    ["freezetune.models", "freezetune.models.weights", "freezetune.models.listing"],
    ["freezetune.freezing"],                               # 4: freeze plans, integrity, unfreezing
    ["freezetune.speed"],                                  # 5: frozen prefix, feature cache, precision
    ["freezetune.training"],                               # 6: the training engine
    ["freezetune.render"],                                 # 7: text, tables, figures
    ["freezetune.compare", "freezetune.inspection", "freezetune.demo", "freezetune.export",
     "freezetune.evaluation"],  # 8: features
    ["freezetune.sweep"],                                  # 9: the sweep, built on compare's arms and workers
    ["freezetune.cli", "freezetune.__main__"],             # 10: the command line
]


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name it resolves to (may not exist: see test_every_import_names_a_module)
    file: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name; a package is its ``__init__.py``."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def is_ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def resolve_relative(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


class ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path):
        self.module, self.path = module, path
        self.found: list[Import] = []

    def add(self, imported: str, node: ast.stmt) -> None:
        found = Import(self.module, imported, self.path, node.lineno)
        if imported != self.module and found not in self.found:  # once per statement, not per name
            self.found.append(found)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if is_ours(alias.name):
                self.add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = resolve_relative(self.module, self.path, node.level, node.module) if node.level else node.module
        if not base or not is_ours(base):
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            # `from pkg import name`: the submodule pkg/name(.py|/__init__.py) if there is one,
            # else a name defined in pkg/__init__.py.
            self.add(sub if alias.name != "*" and sub in MODULES else base, node)


def collect_imports() -> list[Import]:
    imports = []
    for module, path in MODULES.items():
        collector = ImportCollector(module, path)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        imports.extend(collector.found)
    return imports


IMPORTS = collect_imports()


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix that matches ``module``, or None if none does."""
    best, best_len = None, -1
    for layer, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively; returns every component, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def test_the_import_scan_sees_the_package():
    # Guards the other tests against passing vacuously (a wrong path, a broken collector).
    assert {"freezetune", "freezetune.config", "freezetune.cli"} <= set(MODULES)
    assert any(i.importer == "freezetune.cli" for i in IMPORTS)


def test_type_checking_imports_are_counted():
    code = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from freezetune.config import Config\n"
    collector = ImportCollector("freezetune.errors", MODULES["freezetune.errors"])
    collector.visit(ast.parse(code))
    assert [i.imported for i in collector.found] == ["freezetune.config"]


def test_every_import_names_a_module():
    missing = [f"{i.importer} -> {i.imported}  {i.where}" for i in IMPORTS if i.imported not in MODULES]
    if missing:
        pytest.fail("imports of freezetune modules that do not exist:\n" + "\n".join(missing), pytrace=False)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        if i.imported in graph:
            graph[i.importer].add(i.imported)
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    lines = []
    for members in cycles:
        lines.append("cycle: " + ", ".join(members))
        inside = set(members)
        for i in sorted(IMPORTS, key=lambda i: (i.importer, i.line)):
            if i.importer in inside and i.imported in inside:
                lines.append(f"    {i.importer} -> {i.imported}  {i.where}")
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) between modules:\n" + "\n".join(lines), pytrace=False)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    if unplaced:
        pytest.fail("modules with no layer (give each one in LAYERS, in this file): " + ", ".join(unplaced),
                    pytrace=False)


def test_imports_go_to_the_same_or_a_lower_layer():
    upward = []
    for i in sorted(IMPORTS, key=lambda i: (i.importer, i.line)):
        low, high = layer_of(i.importer), layer_of(i.imported)
        if low is not None and high is not None and high > low:
            upward.append(f"{i.importer} (layer {low}) -> {i.imported} (layer {high})  {i.where}")
    if upward:
        pytest.fail(f"{len(upward)} import(s) of a higher layer:\n" + "\n".join(upward), pytrace=False)


def test_config_imports_without_torch():
    # The model-name check imports the catalog (and so torchvision) only while validating.
    code = "import sys, freezetune.config; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"importing freezetune.config imported {proc.stdout.strip()}"
