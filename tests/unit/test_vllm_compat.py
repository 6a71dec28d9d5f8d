"""Every vLLM internal the hooks patch or read must still be where we expect it, with the
signature the wrapper relies on. These fail loudly when a vLLM upgrade moves something (the
compat module must then change)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

from vllm_kvevict.vllm.compat import v0_32
from vllm_kvevict.vllm.patching import original_of


@pytest.mark.parametrize("module,owner,attr,params", v0_32.PATCH_TARGETS, ids=lambda v: str(v))
def test_patch_targets_exist_with_the_wrapped_signature(module, owner, attr, params):
    """The installed vLLM, imported (sources of every supported version: test_vllm_compat_sources)."""
    cls = getattr(importlib.import_module(module), owner)
    assert attr in vars(cls), f"{module}.{owner}.{attr} moved: revisit vllm_kvevict/vllm/compat/v0_32.py"
    raw = original_of(cls, attr)
    fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    names = tuple(inspect.signature(fn).parameters)
    star = params.index("*") if "*" in params else len(params)
    assert names[:star] == params[:star] and set(params[star + 1 :]) <= set(names)


def test_internals_read_by_the_hooks_exist():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.worker.block_table import BlockTable
    from vllm.v1.worker.gpu_input_batch import InputBatch

    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"block_table_tensor", "seq_lens", "max_seq_len", "num_reqs", "seq_lens_cpu_upper_bound"} <= fields
    assert list(inspect.signature(CPUAttentionMetadataBuilder.build).parameters)[:3] == [
        "self", "common_prefix_len", "common_attn_metadata"]
    assert list(inspect.signature(CPUAttentionBackendImpl.forward).parameters)[:7] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata"]
    for name in ("handle_preemptions", "build_connector_worker_meta", "update_connector_output",
                 "bind_kv_cache_manager", "register_kv_caches"):
        assert name in vars(KVConnectorBase_V1), name
    assert "kv_connector_worker_meta" in {f.name for f in dataclasses.fields(KVConnectorOutput)}
    assert {"preempted_req_ids", "finished_req_ids"} <= {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert "resumed_req_ids" in {f.name for f in dataclasses.fields(CachedRequestData)}
    assert "get_cpu_tensor" in vars(BlockTable)
    src = inspect.getsource(InputBatch.__init__)
    assert "self.num_computed_tokens_cpu" in src and "self.block_table" in src and "self._req_ids" in src


def test_the_v1_runner_calls_the_connector_before_it_builds_attention_metadata():
    """The worker receives the step's metadata (resets, admissions, orders) before it plans."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    src = inspect.getsource(GPUModelRunner.execute_model)
    assert src.index("handle_preemptions(") < src.index("_build_attention_metadata(")


def test_install_registers_backend_and_is_idempotent():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from vllm_kvevict.vllm.backends.cpu import BACKEND_CLASS_PATH

    v0_32.install_all()
    v0_32.install_all()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == BACKEND_CLASS_PATH
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_CLASS_PATH
    assert not hasattr(original_of(KVCacheManager, "get_computed_blocks"), "__kvevict_original__")


def test_connector_class_resolves_through_vllm_factory():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_kvevict.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME, KVEvictConnector

    ktc = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_module_path=CONNECTOR_MODULE)
    assert KVConnectorFactory.get_connector_class(ktc) is KVEvictConnector
