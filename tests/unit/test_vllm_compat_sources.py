"""Every supported vLLM release's source has what its compat module hooks and reads.

The installed vLLM (0.32) is read from its installed files; 0.26 (the lent GPU machines') and
0.33 (the current release) from their sdists, fetched once by scripts/fetch_vllm_sources.py
(scripts/setup.sh runs it) into ~/.cache/vllm-kvevict/vllm-src. Checked without importing them:
every patched class method exists with the parameters its wrapper relies on, so does every
stock GPU-backend method our backends override, the state read without a patch is still
declared, and the V1 runner hands the connector the step's metadata
before it builds attention metadata.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from vllm_kvevict.vllm.compat import module_for
from vllm_kvevict.vllm.version import SUPPORTED

ROOT = Path(__file__).resolve().parents[2]


def _source_root(series: str) -> Path:
    installed = Path(importlib.util.find_spec("vllm").origin).parent
    if series == "0.32":
        return installed
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fetch_vllm_sources
    finally:
        sys.path.pop(0)
    version = next(v for v in fetch_vllm_sources.VERSIONS if v.startswith(series + "."))
    try:
        return fetch_vllm_sources.fetch(version)
    except Exception as exc:
        pytest.fail(f"vLLM {version} sources unavailable ({exc}): run scripts/fetch_vllm_sources.py")


@pytest.fixture(scope="module", params=sorted(SUPPORTED))
def release(request):
    return request.param, _source_root(request.param), module_for(request.param)


def _method_params(root: Path, module: str, owner: str, attr: str):
    path = root / (module.split(".", 1)[1].replace(".", "/") + ".py")
    assert path.exists(), f"{module} is gone"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == owner:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == attr:
                    a = item.args
                    return [x.arg for x in a.posonlyargs + a.args], [x.arg for x in a.kwonlyargs]
            raise AssertionError(f"{module}.{owner}.{attr} is gone")
    raise AssertionError(f"{module}.{owner} is gone")


def test_patch_targets_and_signatures(release):
    series, root, compat = release
    for module, owner, attr, params in compat.PATCH_TARGETS:
        positional, keywords = (params[: params.index("*")], params[params.index("*") + 1 :]) if "*" in params \
            else (params, ())
        names, kw_only = _method_params(root, module, owner, attr)
        assert tuple(names[: len(positional)]) == positional, f"vLLM {series} {owner}.{attr}{tuple(names)}"
        assert set(keywords) <= set(names) | set(kw_only), f"vLLM {series} {owner}.{attr}: no {keywords}"


def test_gpu_backend_methods_our_subclasses_override_exist(release):
    """backends/gpu.py's mixins override these and call them through super()."""
    series, root, compat = release
    for module, owner, attr, params in compat.GPU_BACKEND_METHODS:
        names, _ = _method_params(root, module, owner, attr)
        assert tuple(names[: len(params)]) == params, f"vLLM {series} {owner}.{attr}{tuple(names)}"


def test_state_read_without_a_patch_is_declared(release):
    series, root, compat = release
    for file, text in compat.READ_SOURCES:
        assert text in (root / file).read_text(), f"vLLM {series} {file}: {text!r} is gone"


def test_the_runner_hands_the_connector_its_metadata_before_building_attention_metadata(release):
    series, root, compat = release
    file, function, first, then = compat.CALL_ORDER
    src = (root / file).read_text()
    body = src[src.index(function):]
    body = body[: body.index("\n    def ", 1)]
    assert first in body and then in body and body.index(first) < body.index(then), f"vLLM {series}: call order"
