"""The import graph of the package: no cycle, and no module importing a name from a package above it.

Read from the source (every ``import`` statement, at module level or inside a function), so a
lazy import that hides a cycle counts too.
"""
import ast
import os

import tckernels

PACKAGE = "tckernels"


def _modules(root: str) -> dict:
    """``{dotted name: path}`` of the package's source files."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _target(modules: dict, importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    parts = importer.split(".")
    if not modules[importer].endswith("__init__.py"):
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports(modules: dict, importer: str):
    """``(module, names)`` for every import statement of ``importer`` inside the package."""
    tree = ast.parse(open(modules[importer]).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    yield a.name, ()
        elif isinstance(node, ast.ImportFrom):
            mod = _target(modules, importer, node)
            if mod and mod.split(".")[0] == PACKAGE:
                yield mod, tuple(a.name for a in node.names)


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _graph(modules: dict) -> dict:
    """module -> the package modules its imports run (a.b.c runs a and a.b first, except the
    packages that contain the importer, which are already running)."""
    graph = {}
    for m in modules:
        edges = set()
        for mod, names in _imports(modules, m):
            targets = [mod] + [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):
                    q = ".".join(parts[:i])
                    if q in modules and not _is_within(m, q):
                        edges.add(q)
        graph[m] = edges
    return graph


def import_cycles(modules: dict) -> list:
    graph = _graph(modules)
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def imports_back_up(modules: dict) -> list:
    ups = []
    for m in modules:
        for mod, names in _imports(modules, m):
            if m != mod and _is_within(m, mod):
                # a submodule (or the native extension, which has no .py file) is fine; a name
                # defined in the package's __init__ is not
                bad = [n for n in names or ("*",) if f"{mod}.{n}" not in modules and n != "_C"]
                ups += [f"{m}: from {mod} import {n}" for n in bad]
    return ups


MODULES = _modules(os.path.dirname(tckernels.__file__))


def test_the_import_graph_has_no_cycle():
    cycles = import_cycles(MODULES)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_a_name_from_a_package_above_it():
    ups = imports_back_up(MODULES)
    assert not ups, "imports back up:\n" + "\n".join(ups)


def test_the_checks_see_a_cycle_and_an_import_back_up(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from tckernels.sub import a\n__version__ = '0'\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from tckernels.sub import b\n")  # a lazy import counts
    (pkg / "sub" / "b.py").write_text("from tckernels.sub.a import f\nimport tckernels\n")
    modules = _modules(str(pkg))
    assert import_cycles(modules) == ["tckernels.sub.a -> tckernels.sub.b -> tckernels.sub.a"]
    assert imports_back_up(modules) == ["tckernels.sub.b: from tckernels import *"]
