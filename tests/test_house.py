"""The package's import graph runs one way: no module imports (at any depth, top level or inside
a function) one that imports it back."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "svdkern"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from . import distributed` imports the submodule; `from .x import name`, module x
                candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            edges |= {c for c in candidates if c in modules and c != name}
        graph[name] = edges
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert "svdkern.pipeline" in graph and "svdkern.nn" in graph["svdkern.pipeline"]  # the graph is read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_document_the_code_cites_is_in_the_repository():
    import re

    root = PACKAGE.parent
    cited = set()
    for path in [root / "README.md", *root.glob("svdkern/**/*.py"), *root.glob("tests/*.py"),
                 *root.glob("benchmarks/*.py"), *root.glob("csrc/*")]:
        cited |= set(re.findall(r"\b([A-Z]+\.md)\b", path.read_text(errors="replace")))
    assert "METHODS.md" in cited
    missing = [name for name in cited if not (root / "docs" / name).is_file() and not (root / name).is_file()]
    assert missing == []
