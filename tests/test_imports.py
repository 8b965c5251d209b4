"""Imports point down the layers of ``pipeline/`` and never go round in a cycle.

Every import counts: module-level and function-level, ``import x`` and ``from x import y``
(relative ones resolved), ``TYPE_CHECKING`` blocks included: a hidden upward arrow is still one.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from pipeline.paths import PROJECT_ROOT

# Lowest first; a module may import its own layer or a lower one. A pattern names a module or a
# package (and everything in it); ``*`` matches within a name (``pipeline.rle*``). The root
# package's own ``__init__`` is layer 0; a module no pattern names fails until it is placed.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "pipeline.paths",
        "pipeline.io",
        "pipeline.config",
        "pipeline.runtime",
        "pipeline.errors",
        "pipeline.device",
    ),
    ("pipeline.rle*",),
    ("pipeline.data",),
    ("pipeline.datasets", "pipeline.phantoms"),
    ("pipeline.models",),
    ("pipeline.train",),
    ("pipeline.infer",),
    ("pipeline.kaggle", "pipeline.report"),
    ("pipeline.bench",),
)

Edge = tuple[str, str, int]  # importer, imported, line


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every import of one package module by another, wherever it sits in the file."""
    modules = module_files(root, package)
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, is_package)
                # ``from pkg import mod`` imports the module pkg.mod; ``from mod import f`` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]  # ``import pkg.mod.attr``-like spellings
                if target in modules and target != name:
                    edges.append((name, target, node.lineno))
    return edges


def layer_of(module: str, layers: Sequence[Sequence[str]]) -> int | None:
    """The layer of the most specific pattern naming ``module``; the root package is layer 0."""
    if "." not in module:
        return 0
    best: tuple[int, int] | None = None  # (pattern length, layer)
    for index, patterns in enumerate(layers):
        for p in patterns:
            if (fnmatchcase(module, p) or fnmatchcase(module, p + ".*")) and (
                best is None or len(p) > best[0]
            ):
                best = (len(p), index)
    return None if best is None else best[1]


def upward_imports(root: Path, package: str, layers: Sequence[Sequence[str]]) -> list[str]:
    """``importer -> imported (line N)`` for each import of a higher layer, or of an unlayered module."""
    found = []
    for importer, imported, line in import_edges(root, package):
        low, high = layer_of(importer, layers), layer_of(imported, layers)
        if low is None or high is None:
            missing = importer if low is None else imported
            found.append(f"{importer} -> {imported} (line {line}): {missing} is in no layer")
        elif high > low:
            found.append(f"{importer} -> {imported} (line {line}): layer {low} imports layer {high}")
    return sorted(set(found))


def import_cycles(root: Path, package: str) -> list[str]:
    """Each group of modules that import one another, as one of its cycles ``a -> b (line) -> a``."""
    graph: dict[str, dict[str, int]] = {}
    for importer, imported, line in import_edges(root, package):
        graph.setdefault(importer, {}).setdefault(imported, line)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until a module repeats
            nxt = min(n for n in graph[path[-1]] if n in group)
            if nxt in seen:
                path = [*path[path.index(nxt) :], nxt]
                break
            path.append(nxt)
            seen.add(nxt)
        hops = [f"{a} -> {b} (line {graph[a][b]})" for a, b in itertools.pairwise(path)]
        cycles.append("; ".join(hops))
    return sorted(cycles)


def test_pipeline_imports_point_down() -> None:
    found = upward_imports(PROJECT_ROOT, "pipeline", LAYERS)
    assert not found, "imports that point up the layers:\n" + "\n".join(found)


def test_pipeline_has_no_import_cycles() -> None:
    found = import_cycles(PROJECT_ROOT, "pipeline")
    assert not found, "import cycles:\n" + "\n".join(found)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_catches_a_planted_upward_import(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "fake/__init__.py": "",
            "fake/low.py": "import os\n\n\ndef f():\n    from fake.high.mod import g\n    return g\n",
            "fake/base.py": "from . import low\n",  # relative, same layer: fine
            "fake/high/__init__.py": "",
            "fake/high/mod.py": "from ..low import f\nimport fake.base\n\n\ndef g():\n    return f\n",
            "fake/high/sibling.py": "from fake.high import mod\nfrom . import mod as again\n",
        },
    )
    layers = (("fake.low", "fake.base"), ("fake.high",))
    assert upward_imports(tmp_path, "fake", layers) == [
        "fake.low -> fake.high.mod (line 5): layer 0 imports layer 1"
    ]
    assert upward_imports(tmp_path, "fake", (("fake.low", "fake.high"),)) == [
        "fake.base -> fake.low (line 1): fake.base is in no layer",
        "fake.high.mod -> fake.base (line 2): fake.base is in no layer",
    ]
    assert import_cycles(tmp_path, "fake") == [  # base -> low -> high.mod -> base: one cycle of three
        "fake.base -> fake.low (line 1); fake.low -> fake.high.mod (line 5); fake.high.mod -> fake.base (line 2)"
    ]


def test_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    _write(tmp_path, {"fake/__init__.py": "", "fake/a.py": "import fake.b\n", "fake/b.py": "import numpy\n"})
    assert upward_imports(tmp_path, "fake", (("fake.b",), ("fake.a",))) == []
    assert import_cycles(tmp_path, "fake") == []
