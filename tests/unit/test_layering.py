"""Only vllm_kvevict/vllm/ may import vllm: the day vLLM changes an internal API, one folder changes."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_kvevict"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_vllm_folder_imports_vllm():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "vllm" in _imports(path) and (PACKAGE / "vllm") not in path.parents
    ]
    assert offenders == []
