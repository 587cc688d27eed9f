"""The package layout keeps its promises: one direction of imports, no cycles, no privates.

Read statically from the source (every import counts: module level, function-local and
``TYPE_CHECKING`` ones), so a cycle held together by a local import still fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "engine", "consumers")
LAYER = {"schemas": 0, "engine": 1, "consumers": 2}
"""schemas ← engine ← consumers: a package imports only from its own layer or below."""
KAFKA_OR_HTTP = ("aiokafka", "aiohttp", "kafka", "http.server", "urllib.request")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["tally", *parts])] = path
    return out


def _pkg(module: str) -> str | None:
    """The package of ours a dotted name is in (``tally.engine.keys`` → ``engine``), or None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tally" and parts[1] in PACKAGES else None


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names, line) for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield _resolve(module, node), [a.name for a in node.names], node.lineno


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, names, _ in _imports(m):
            if _pkg(target) is None:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                graph[m].update(subs)
                if len(subs) < len(names):
                    graph[m].add(target)
            elif target in MODULES:
                graph[m].add(target)
    for m in graph:
        graph[m].discard(m)
    return graph


def test_no_import_cycles() -> None:
    graph = _edges()
    # A package's __init__ re-exporting its submodules is not a cycle: importing a submodule
    # initializes the parent first, by Python's rules, not by an import statement of ours.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_imports_go_one_way_and_the_engine_knows_no_kafka_or_http() -> None:
    wrong = []
    for m in MODULES:
        pkg = _pkg(m)
        assert pkg is not None
        layer = LAYER[pkg]
        for target, _, line in _imports(m):
            top = _pkg(target)
            if top is not None and LAYER[top] > layer:
                wrong.append(f"{m}:{line} imports {target} (a layer above)")
            if layer < LAYER["consumers"] and target.startswith(KAFKA_OR_HTTP):
                wrong.append(f"{m}:{line} imports {target} (Kafka/HTTP belong in consumers)")
    assert not wrong, "\n".join(wrong)


def _defined_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    for node in ast.walk(tree):  # __slots__ and Struct/dataclass fields
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def test_no_module_reaches_into_another_modules_privates() -> None:
    """A ``_private`` defined in one of our modules is used there only. (Subclasses of other
    projects' classes may use those projects' internals: that is pinned by the lock file.)"""
    trees = {m: ast.parse(path.read_text()) for m, path in MODULES.items()}
    defined = {m: _defined_names(t) for m, t in trees.items()}
    wrong = []
    for m, tree in trees.items():
        own = defined[m]
        ours = {n for o, names in defined.items() if o != m for n in names if n.startswith("_")}
        # Modules of other projects (argparse._SubParsersAction is how argparse is typed).
        foreign = {
            (a.asname or a.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for a in node.names
            if a.name.split(".")[0] != "tally"
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(m, node)
                if _pkg(target) is not None:
                    wrong += [
                        f"{m}:{node.lineno} imports {target}.{a.name}"
                        for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                    ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
                and node.attr in ours
                and not (isinstance(node.value, ast.Name) and node.value.id in foreign)
            ):
                wrong.append(f"{m}:{node.lineno} uses .{node.attr}, defined in another module")
    assert not wrong, "\n".join(wrong)
