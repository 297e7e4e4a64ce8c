"""The code's shape: no import cycle between any two modules of ``jobs`` and ``worker``,
deferred (function-level) and type-checking imports included, and the import contracts of
``pyproject.toml`` hold (``lint-imports`` in CI; a wrong import is shown to break them in
``tests/e2e/test_layers_contract.py``)."""

from __future__ import annotations

import grimp


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over the module graph: every group of modules that import each other,
    directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_no_two_modules_import_each_other_even_through_deferred_imports() -> None:
    graph = grimp.build_graph("jobs", "worker", exclude_type_checking_imports=False)
    assert strongly_connected(graph) == []


def test_the_domain_imports_nothing_of_the_runtime() -> None:
    graph = grimp.build_graph("jobs", "worker")
    assert not graph.find_illegal_dependencies_for_layers(layers=["worker", "jobs"])
