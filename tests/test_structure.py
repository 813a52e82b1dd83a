"""The shape of the code: no import cycles between the project's modules, the layers import
only downwards, and no function in bot/ or adapters/ is over 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "adapters", "models", "launcher")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[str | None, int, list[str]]]:
    """(module, level, names) of every import that runs, also inside functions; imports only
    for type checkers (`if TYPE_CHECKING:`) are not dependencies at run time."""
    out: list[tuple[str | None, int, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                out.extend((alias.name, 0, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.append((child.module, child.level, [alias.name for alias in child.names]))
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        edges = graph.setdefault(name, set())
        for module, level, names in _imports(ast.parse(path.read_text(), str(path))):
            base = ".".join(here[: len(here) - level + 1]) if level else ""
            target = ".".join(p for p in (base, module or "") if p)
            submodules = {f"{target}.{n}" for n in names} & modules.keys()  # `from . import texts`
            edges.update((submodules or ({target} & modules.keys())) - {name})
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert "bot.app" in graph and "bot.features" in graph["bot.app"], "the walker must see the project's imports"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_only_downwards():
    allowed = {"models": {"models"}, "bot": {"bot", "models"}, "adapters": {"adapters", "bot"}, "launcher": set(PACKAGES)}
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] not in allowed[module.split(".")[0]]
    ]
    assert wrong == []


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_in_the_core_or_the_adapters_is_over_60_lines():
    paths = [*sorted((REPO / "bot").rglob("*.py")), *sorted((REPO / "adapters").rglob("*.py"))]
    assert len(paths) > 10
    assert [line for path in paths for line in _long_functions(path)] == []
