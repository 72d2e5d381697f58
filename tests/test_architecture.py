"""The house rules of the code base, read from its syntax (no import of the package): modules use each other's public
names only, imports flow one way without circles, data/ stands below generation and RL, and functions and files
stay short. The tests themselves use private names only of the module they test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "medix_jax"
MAX_FUNCTION_LINES, MAX_FILE_LINES = 80, 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(tree: ast.AST) -> list[tuple[str, str | None, str | None, int]]:
    """(module imported, name taken from it or None, local alias, line) of every medix_jax import, function-local
    ones included. ``from medix_jax.a import b`` with b a module counts as importing module medix_jax.a.b."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, a.asname or a.name, node.lineno) for a in node.names
                    if a.name.startswith("medix_jax")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medix_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in MODULES:
                    out.append((sub, None, a.asname or a.name, node.lineno))
                else:
                    out.append((node.module, a.name, a.asname or a.name, node.lineno))
    return out


def private_members() -> dict[str, set[str]]:
    """Module -> the private names it defines: top-level functions, classes and assignments, methods, and
    ``self._x`` attributes."""
    defined: dict[str, set[str]] = {}
    for name, tree in TREES.items():
        names = defined.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and private(node.attr):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and private(node.id):
                names.add(node.id)
    return defined


DEFINED = private_members()


def private_uses(tree: ast.AST, own: set[str]) -> list[str]:
    """Private names of other medix_jax modules that ``tree`` imports or reaches (``module._x``, ``obj._x``), except
    those of the modules in ``own``."""
    found = []
    aliases = {}
    for module, name, alias, line in imports(tree):
        if name is not None and private(name) and module not in own:
            found.append(f"line {line}: imports {module}.{name}")
        if name is None:
            aliases[alias.split(".")[0] if "." in alias else alias] = module
    mine = set().union(*(DEFINED.get(m, set()) for m in own))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and private(node.attr)):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in aliases and aliases[base.id] not in own:
            found.append(f"line {node.lineno}: {base.id}.{node.attr} (module {aliases[base.id]})")
        elif isinstance(base, ast.Name) and base.id in ("self", "cls"):
            continue
        elif node.attr not in mine and any(node.attr in names for m, names in DEFINED.items() if m not in own):
            owners = sorted(m for m, names in DEFINED.items() if node.attr in names and m not in own)
            found.append(f"line {node.lineno}: .{node.attr} (defined in {', '.join(owners)})")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_use_only_public_names_of_other_modules(module):
    assert not private_uses(TREES[module], {module}), private_uses(TREES[module], {module})


def test_no_import_circle_and_data_stands_below_generation_and_rl():
    graph = {name: {m for m, _, _, _ in imports(tree) if m in MODULES and m != name} for name, tree in TREES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles
    upward = [f"{m} imports {dep}" for m, deps in graph.items() if m.startswith("medix_jax.data")
              for dep in deps if dep.startswith(("medix_jax.rl", "medix_jax.generate", "medix_jax.train"))]
    assert not upward, upward


def test_functions_and_files_are_short():
    long = []
    for name, tree in TREES.items():
        lines = len(MODULES[name].read_text().splitlines())
        if lines > MAX_FILE_LINES:
            long.append(f"{MODULES[name].relative_to(ROOT)}: {lines} lines")
        long += [f"{MODULES[name].relative_to(ROOT)}: {node.name} is {node.end_lineno - node.lineno + 1} lines"
                 for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def modules_under_test(test: Path) -> set[str]:
    """The modules a test file tests: those whose own name is the file's (``test_packing.py``: ``rl.packing``)."""
    stem = test.stem.removeprefix("test_")
    return {m for m in MODULES if m.rsplit(".", 1)[-1] == stem}


@pytest.mark.parametrize("test", sorted(str(p.relative_to(ROOT / "tests")) for p in (ROOT / "tests").rglob("*.py")))
def test_tests_use_private_names_only_of_the_module_they_test(test):
    path = ROOT / "tests" / test
    uses = private_uses(ast.parse(path.read_text()), modules_under_test(path))
    assert not uses, uses


def test_every_reference_citation_names_a_heading_of_docs_reference():
    headings = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in (ROOT / "docs" / "reference.md").read_text().splitlines() if line.startswith("#")}
    files = [p for folder in ("medix_jax", "configs", "docs", "scripts", "tests") for p in (ROOT / folder).rglob("*")
             if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh")] + [ROOT / "README.md"]
    cited, stale = [], []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        cited += [(path.name, anchor) for anchor in re.findall(r"reference\.md#([a-z0-9-]+)", text)]
        stale += [path.name for _ in re.findall(r"REFERENCE §|REFERENCE\.md", text)]
    assert cited and not stale, stale
    missing = sorted({f"{name}: #{anchor}" for name, anchor in cited if anchor not in headings})
    assert not missing, missing
