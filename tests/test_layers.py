"""The package's layers: modules import one another without cycles, at any depth.

Read from the source (every ``import`` statement, also those inside functions),
so a cycle hidden behind a local import fails here too.
"""

from __future__ import annotations

import ast
import os
import pkgutil

import draw_jax

PACKAGE = os.path.dirname(draw_jax.__file__)
MODULES = sorted(m.name for m in pkgutil.iter_modules([PACKAGE]))


def imports_of(name: str) -> set[str]:
    """The draw_jax modules ``draw_jax.<name>`` imports, wherever in the file."""
    with open(os.path.join(PACKAGE, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "draw_jax":
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("draw_jax."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("draw_jax.")}
    return found - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    graph = {name: imports_of(name) for name in MODULES if name != "__init__"}
    assert "pretrained" in graph["settings"] and "config" in graph["pretrained"]  # the graph is read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_config_is_the_bottom_layer():
    # The schema imports only data facts, never what is built on it.
    assert imports_of("config") <= {"data"}
