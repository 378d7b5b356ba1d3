"""The tree is the architecture: imports point from the edges to the centre, never
back, and no modules import each other in a circle.

The graph is built from the source with `ast` (every import, at the top of a module
or inside a function, except those under `if TYPE_CHECKING:`), so a lazy import that
hides a circle from Python's import machinery is still caught here.

Layers of p402_server, edges first:
- edges: cli (and the demo), api (servicers), gateways, dashboard, server, workers,
  and assembly, which puts a process's parts together;
- centre: runtime, wire, ledger, privacy — and below everything, p402core.
observe (logs, metrics, traces), amounts, listen, gc_policy and httpconn are
utilities anyone may use; they import no edge either. The SDK (p402_client) never
imports the server, and p402core imports neither.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TREES = {
    "p402_server": os.path.join(ROOT, "server"),
    "p402_client": os.path.join(ROOT, "clients", "python"),
    "p402core": ROOT,
}
EDGES = ("cli", "api", "gateways", "dashboard", "server", "workers", "assembly")
CENTRE = ("runtime", "wire", "ledger", "privacy")
UTILITIES = ("observe", "amounts", "listen", "gc_policy", "httpconn")


def _modules() -> dict[str, str]:
    out = {}
    for pkg, root in TREES.items():
        for dirpath, _dirs, files in os.walk(os.path.join(root, pkg)):
            if "migrations" in dirpath.split(os.sep):
                continue  # alembic's scripts: run by alembic, imported by no module
            for f in files:
                if f.endswith(".py"):
                    name = os.path.relpath(os.path.join(dirpath, f), root)[:-3]
                    name = name.replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = \
                        os.path.join(dirpath, f)
    return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    """The known modules `module` imports (a name imported from a package is an edge
    to its submodule when it is one, else to the package)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    is_pkg = path.endswith("__init__.py")
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            subs = [f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in known]
            targets = subs + ([origin] if len(subs) < len(node.names) else [])
        for name in targets:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _area(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "p402_server":
        return parts[0]
    return parts[1] if len(parts) > 1 else "p402_server"


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        here = _area(module)
        for dep in sorted(deps):
            there = _area(dep)
            if module.startswith("p402core") and not dep.startswith("p402core"):
                bad.append(f"{module} -> {dep} (the core imports nothing of P402's)")
            elif module.startswith("p402_client") and dep.startswith("p402_server"):
                bad.append(f"{module} -> {dep} (the SDK never imports the server)")
            elif (here in CENTRE or here in UTILITIES) and there in EDGES:
                bad.append(f"{module} -> {dep} (the centre imports no edge)")
    return bad


GRAPH = import_graph()


def test_the_graph_covers_the_tree():
    # the checks below mean something only if the graph sees the modules and edges
    assert "p402_server.runtime.tenant" in GRAPH and "p402core._engine_py" in GRAPH
    assert "p402_server.ledger" in GRAPH["p402_server.assembly"]
    assert "p402_server.cli.output" in GRAPH["p402_server.cli.demo"]
    assert sum(len(d) for d in GRAPH.values()) > 200


def test_no_import_circles():
    assert cycles(GRAPH) == []


def test_imports_point_from_the_edges_to_the_centre():
    assert layering_violations(GRAPH) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"c"}}, []),  # a self-import is no circle of modules
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert sorted(cycles(graph)) == expected


def test_the_layering_check_names_a_centre_importing_an_edge():
    graph = {"p402_server.runtime.tenant": {"p402_server.cli.main"},
             "p402_server.cli.main": {"p402_server.runtime.tenant"},
             "p402core._engine_py": {"p402_server.ledger"},
             "p402_client.client": {"p402_server.wire.convert"}}
    assert layering_violations(graph) == [
        "p402_client.client -> p402_server.wire.convert (the SDK never imports the server)",
        "p402_server.runtime.tenant -> p402_server.cli.main (the centre imports no edge)",
        "p402core._engine_py -> p402_server.ledger (the core imports nothing of P402's)",
    ]
