"""The package's import graph: no cycles, and the attention backends never import the worker."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "vllm_kvevict"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the ``vllm_kvevict`` modules it imports (at any depth of the file)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm_kvevict"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("vllm_kvevict")]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _is_package_init(module: str, graph) -> bool:
    return (ROOT.parent / module.replace(".", "/") / "__init__.py").exists()


def test_no_import_cycle():
    graph = _imports()
    # a package importing its own submodules (its __init__ re-exporting them) is not a cycle
    pruned = {m: {d for d in deps if not (_is_package_init(m, graph) and d.startswith(m + "."))}
              for m, deps in graph.items()}
    cycle = _cycle(pruned)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_attention_backends_do_not_import_the_worker_or_the_connector():
    graph = _imports()
    for module, deps in graph.items():
        if module.startswith("vllm_kvevict.vllm.backends"):
            bad = {d for d in deps if d.startswith(("vllm_kvevict.vllm.worker", "vllm_kvevict.vllm.connector",
                                                    "vllm_kvevict.vllm.scheduler"))}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_files_stay_small():
    """Modules split by concern before they pass a few hundred lines."""
    big = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big


def test_test_files_have_unique_names():
    """pytest imports test modules by basename (rootdir mode): two files of one name in
    different folders stop the whole suite at collection."""
    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]
