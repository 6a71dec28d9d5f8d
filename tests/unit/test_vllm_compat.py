"""Every vLLM internal the eviction hooks patch or read must still be where we expect it.

These fail loudly when a vLLM upgrade moves something (the compat module must then change).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from types import SimpleNamespace

import pytest

from vllm_kvevict.vllm.compat import v0_32


@pytest.mark.parametrize("module,owner,attr", v0_32.PATCH_TARGETS, ids=lambda v: str(v))
def test_patch_targets_exist(module, owner, attr):
    cls = getattr(importlib.import_module(module), owner)
    assert attr in vars(cls), f"{module}.{owner}.{attr} moved: revisit vllm_kvevict/vllm/compat/v0_32.py"


def _params(fn):
    return list(inspect.signature(fn).parameters)


def test_patched_signatures_are_the_ones_wrapped():
    from vllm.config.vllm import VllmConfig
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvevict.vllm.patching import original_of

    runner = _params(original_of(GPUModelRunner, "_build_attention_metadata"))
    assert runner[:3] == ["self", "num_tokens", "num_reqs"] and "for_cudagraph_capture" in runner
    assert _params(original_of(KVCacheCoordinator, "cache_blocks")) == ["self", "request", "num_computed_tokens"]
    assert _params(original_of(KVCacheManager, "get_computed_blocks")) == ["self", "request"]
    assert "KVCacheBlocks, int, int]" in str(inspect.signature(original_of(KVCacheManager, "get_computed_blocks")).return_annotation)
    assert _params(original_of(VllmConfig, "_post_init_kv_transfer_config")) == ["self"]
    assert hasattr(KVCacheManager, "truncate_computed_blocks")


def test_internals_read_by_the_hooks_exist():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
    from vllm.v1.outputs import KVConnectorOutput

    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"block_table_tensor", "seq_lens", "max_seq_len", "num_reqs"} <= fields
    assert _params(CPUAttentionMetadataBuilder.build)[:3] == ["self", "common_prefix_len", "common_attn_metadata"]
    assert _params(CPUAttentionBackendImpl.forward)[:7] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata"
    ]
    for name in ("handle_preemptions", "build_connector_worker_meta", "update_connector_output", "bind_kv_cache_manager"):
        assert name in vars(KVConnectorBase_V1), name
    assert "kv_connector_worker_meta" in {f.name for f in dataclasses.fields(KVConnectorOutput)}
    assert {"preempted_req_ids", "finished_req_ids"} <= {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert "resumed_req_ids" in {f.name for f in dataclasses.fields(CachedRequestData)}
    assert "_remove_blocks_in_range" in vars(SingleTypeKVCacheManager)  # the null-block precedent we copy
    src = inspect.getsource(SingleTypeKVCacheManager.__init__)
    assert "self.req_to_blocks" in src and "self._null_block" in src


def test_install_registers_backend_and_is_idempotent():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvevict.vllm import eviction_hooks
    from vllm_kvevict.vllm.backend import BACKEND_CLASS_PATH

    eviction_hooks.install()
    eviction_hooks.install()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == BACKEND_CLASS_PATH
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_CLASS_PATH
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vllm_kvevict.vllm.patching import original_of

    inner = original_of(KVCacheManager, "get_computed_blocks")
    assert not hasattr(inner, "__kvevict_original__")  # wrapped once, not twice


def test_ensure_connector_only_when_eviction_is_configured():
    from vllm_kvevict.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME

    plain = SimpleNamespace(additional_config={}, kv_transfer_config=None)
    assert not v0_32.ensure_connector(plain) and plain.kv_transfer_config is None
    asked = SimpleNamespace(additional_config={"kv_eviction": {"scorer": "snapkv"}}, kv_transfer_config=None)
    assert v0_32.ensure_connector(asked)
    ktc = asked.kv_transfer_config
    assert (ktc.kv_connector, ktc.kv_connector_module_path, ktc.kv_role) == (CONNECTOR_NAME, CONNECTOR_MODULE, "kv_both")
    from vllm.config import KVTransferConfig

    other = SimpleNamespace(
        additional_config={"kv_eviction": {"scorer": "snapkv"}},
        kv_transfer_config=KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both"),
    )
    assert not v0_32.ensure_connector(other)
    assert other.kv_transfer_config.kv_connector == "OffloadingConnector"


def test_connector_class_resolves_through_vllm_factory():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_kvevict.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME, KVEvictConnector

    ktc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_module_path=CONNECTOR_MODULE)
    assert KVConnectorFactory.get_connector_class(ktc) is KVEvictConnector
