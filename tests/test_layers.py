"""The package's layers (docs/ARCHITECTURE.md): arrows point only down, and no import circles.

entry points (kdlab, kdlab.api, train, packed, evaluate, export, cli, compare)
  → modes → engine → parts (strategies, models, data, optim) → util

Within the parts, models and data stand alone (they import only themselves and util) and
strategies may read models (module paths) and data (the unlabelled marker). Every ``import``
counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kdlab"
ENTRY = {"kdlab", "kdlab.api", "kdlab.train", "kdlab.packed", "kdlab.evaluate", "kdlab.export",
         "kdlab.cli"}
RANK = {"util": 0, "parts": 1, "engine": 2, "modes": 3, "entry": 4}
#: what each part may import besides util (data never imports strategies; models stand alone)
PARTS = {"models": {"models"}, "data": {"data"}, "optim": {"optim"},
         "strategies": {"strategies", "models", "data"}}

#: forbidden imports that remain, to be removed (each also fails the test once it is gone, so
#: the list can only shrink)
KNOWN: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("kdlab", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer(module: str) -> tuple[str, str]:
    """(layer, part) of a kdlab module."""
    if module in ENTRY or module.startswith("kdlab.compare"):
        return "entry", ""
    second = module.split(".")[1]
    if second in ("modes", "engine", "util"):
        return second, ""
    if second in PARTS:
        return "parts", second
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py")


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The kdlab modules ``module`` imports (``from a import b`` counts ``a.b`` when it is a
    module)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import kdlab.x.y` of a function's module
                name = name.rpartition(".")[0]
            if name.startswith("kdlab") and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def allowed(source: str, target: str) -> bool:
    if target == "kdlab":  # the package itself: only its lazy API, never imported inside
        return source in ENTRY
    (a, part_a), (b, part_b) = layer(source), layer(target)
    if RANK[b] > RANK[a]:
        return False
    if a == b == "parts":
        return part_b in PARTS[part_a]
    return True


def test_every_import_points_down_the_layers():
    bad = {(s, t) for s, targets in graph().items() for t in targets if not allowed(s, t)}
    new = sorted(bad - KNOWN)
    assert not new, "imports against the layers (docs/ARCHITECTURE.md):\n" + "\n".join(
        f"  {s} -> {t}" for s, t in new)
    gone = sorted(KNOWN - bad)
    assert not gone, f"remove these from KNOWN in tests/test_layers.py: {gone}"


def test_no_import_circles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_only_modes_and_entry_points_read_the_config():
    """The engine and the parts take objects (kdlab/engine/spec.py), never a DictConfig: they
    import neither omegaconf nor hydra."""
    readers = []
    for module, path in modules().items():
        if layer(module)[0] not in ("engine", "parts"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            readers += [f"{module} imports {n}" for n in names
                        if n.split(".")[0] in ("omegaconf", "hydra")]
    assert not readers, readers


def _private_uses(path: Path, own: set[str]) -> list[str]:
    """Private names of other packages used in ``path``: ``obj._name`` where ``_name`` is not
    one of kdlab's own names, imports of ``_private`` modules or names, and assignments to
    ``module._name`` (replacing a library's function)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__") and node.attr != "_target_":
            base = node.value.id if isinstance(node.value, ast.Name) else ""
            if node.attr not in own or (isinstance(node.ctx, ast.Store)
                                        and base not in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__" \
                and not node.module.startswith("kdlab"):
            names = [*node.module.split("."), *(a.name for a in node.names)]
            found += [f"{path.name}:{node.lineno} {n} (from {node.module})" for n in names
                      if n.startswith("_")]
    return found


def _own_names() -> set[str]:
    """Names kdlab defines: functions, classes, and attributes set on ``self`` / ``cls``."""
    own = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
    return own


def test_no_private_api_of_lightning_or_other_libraries():
    """kdlab uses Lightning's (and torch's, Hydra's) public API only: no private attribute,
    module or function of theirs is read, imported or replaced."""
    own = _own_names()
    found = [use for path in modules().values() for use in _private_uses(path, own)]
    assert not found, found


@pytest.mark.parametrize("source, target, ok", [
    ("kdlab.engine.fit", "kdlab.modes.offline", False),
    ("kdlab.data.memory", "kdlab.strategies.base", False),
    ("kdlab.strategies.base", "kdlab.engine.taps", False),
    ("kdlab.util.files", "kdlab.engine.cache", False),
    ("kdlab.modes.offline", "kdlab.engine.fit", True),
    ("kdlab.strategies.base", "kdlab.data.memory", True),
])
def test_the_rules_themselves(source, target, ok):
    assert allowed(source, target) is ok
