"""The GPU backends' scoring gives ``policy.score_layer``'s scores, to rounding.

One prompt, prefilled in one chunk, observed by the GPU path (:func:`observe_rows_gpu`: Triton
kernels, interpreted here, reading the paged cache in place; or, for the scorers they do not
cover, the torch path on host copies) and by the CPU backend's path (``observe_rows``: the
gathered tensors through ``policy.score_layer``, what the exactness tests pin against the
reference engine), on the same cache in vLLM's GPU layout (NHD memory). The two must give the
same protected, preferred and fixed head budgets, and values within the exactness tests'
tolerance (tests/kept_sets.py).
"""

from __future__ import annotations

import pytest
import torch
from kept_sets import assert_scores_close

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import build_policy
from vllm_kvevict.vllm.backends.gpu_observe import ScoringStep, observe_rows_gpu
from vllm_kvevict.vllm.backends.observe import observe_rows
from vllm_kvevict.vllm.backends.paged_scoring import kernel_recipe
from vllm_kvevict.vllm.layouts import SplitHeadDimLayout
from vllm_kvevict.vllm.model_info import ModelInfo
from vllm_kvevict.vllm.step import EvictionStep, Observations, RowObservation

BS, HKV, G, D, LAYERS, PROMPT, WINDOW = 16, 2, 4, 32, 2, 150, 8
H = HKV * G

#: covered by the kernels
KERNEL = {
    "snapkv-pages": {"kv_eviction": "snapkv"},
    "snapkv-tokens": {"kv_eviction": "snapkv", "kv_head_selection": "token"},
    "snapkv-max-pool": {"kv_eviction": "snapkv", "kv_pooling": "max", "kv_pooling_kernel": 7},
    "snapkv-page-granularity": {"kv_eviction": "snapkv", "kv_granularity": "page"},
    "pyramidkv": {"kv_eviction": "pyramidkv"},
    "tova": {"kv_eviction": "tova"},
    "laprox": {"kv_eviction": "laprox"},
    "streamingllm": {"kv_eviction": "streamingllm"},
    "criticalkv-pages": {"kv_eviction": "criticalkv"},
    "criticalkv-tokens": {"kv_eviction": "criticalkv", "kv_head_selection": "token"},
    "criticalkv-uniform-page": {"kv_eviction": "criticalkv", "kv_allocation": "uniform", "kv_granularity": "page"},
    "criticalkv-global": {"kv_eviction": "criticalkv", "kv_allocation": "global"},
    "criticalkv-tova": {"kv_eviction": "criticalkv", "kv_criticalkv_base": "tova", "kv_head_selection": "token"},
}
#: scored by the torch path on host copies
FALLBACK = {
    "defensivekv": {"kv_eviction": "defensivekv"},
    "knorm": {"kv_eviction": "knorm"},
    "keydiff": {"kv_eviction": "keydiff"},
    "h2o": {"kv_eviction": "h2o"},
    "expected_attention": {"kv_eviction": "expected_attention"},
    "value_aware": {"kv_eviction": "value_aware"},
    "criticalkv-h2o": {"kv_eviction": "criticalkv", "kv_criticalkv_base": "h2o"},
}


class _Rotary(torch.nn.Module):
    """The fields of vLLM's NeoX rotary embedding that scoring reads."""

    def __init__(self) -> None:
        super().__init__()
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
        freqs = torch.outer(torch.arange(4096).float(), inv)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1))
        self.is_neox_style, self.rotary_dim, self.head_size = True, D, D


def _model(gen: torch.Generator) -> ModelInfo:
    layers = torch.nn.ModuleList()
    for _ in range(LAYERS):
        attn = torch.nn.Module()
        attn.o_proj = torch.nn.Linear(H * D, 48, bias=False)
        attn.o_proj.weight.data = torch.randn(48, H * D, generator=gen)
        attn.rotary_emb = _Rotary()
        layer = torch.nn.Module()
        layer.self_attn = attn
        layers.append(layer)
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = layers
    return ModelInfo(root, LAYERS)


def _scores(config: EvictionConfig, gpu: bool, cache, queries, blocks, model, dtype):
    policy = build_policy(config, BS)
    needs = policy.needs
    sink = Observations(policy, config, PROMPT)
    collect = (config.resolved_sinks if needs.query_stats else 0, PROMPT) \
        if (needs.query_stats or needs.attention_sums) else (0, 0)
    row = RowObservation("r", 0, PROMPT, 0, (PROMPT - config.window, PROMPT), collect, True, blocks, sink)
    step = EvictionStep(observe={0: row}, head_rows={}, table_rows={}, model=model)
    layout = SplitHeadDimLayout(HKV, BS, D)
    scoring = ScoringStep.of(step, torch.device("cpu"))
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.self_attn.attn"
        q = queries[layer].to(dtype)
        if gpu:
            observe_rows_gpu(step, scoring, name, layer, q, cache[layer], layout, H, D ** -0.5)
        else:
            observe_rows(step, name, layer, q, cache[layer], layout, H, D ** -0.5)
    assert sink.error is None, sink.error
    return [sink.scores[i] for i in range(LAYERS)]


def _case(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(30, generator=gen)[: -(-PROMPT // BS)] + 1
    cache = [torch.full((32, BS, HKV, 2 * D), float("nan"), dtype=dtype).permute(0, 2, 1, 3) for _ in range(LAYERS)]
    pos = torch.arange(PROMPT)
    for layer in range(LAYERS):
        # peaked attention, so that scores are far from uniform
        cache[layer][blocks[pos // BS], :, pos % BS] = (2 * torch.randn(PROMPT, HKV, 2 * D, generator=gen)).to(dtype)
    queries = [torch.randn(PROMPT, H * D, generator=gen) for _ in range(LAYERS)]
    return cache, queries, blocks, _model(gen)


@pytest.mark.parametrize("name", list(KERNEL) + list(FALLBACK))
def test_gpu_scoring_equals_the_reference_path(name, seed):
    flat = {**KERNEL, **FALLBACK}[name]
    config = EvictionConfig.from_flat({**flat, "kv_budget": 0.3, "kv_window": WINDOW})
    assert (kernel_recipe(build_policy(config, BS).scorer) is not None) == (name in KERNEL)
    case = _case(seed, torch.float32)
    served = _scores(config, True, *case, torch.float32)
    reference = _scores(config, False, *case, torch.float32)
    assert_scores_close(served, reference, name)


def test_gpu_scoring_reads_a_bf16_cache(seed):
    config = EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_budget": 0.3, "kv_window": WINDOW})
    case = _case(seed, torch.bfloat16)
    assert_scores_close(_scores(config, True, *case, torch.bfloat16), _scores(config, False, *case, torch.bfloat16))


def test_a_scoring_failure_leaves_the_request_whole_and_never_raises(seed):
    config = EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_budget": 0.3, "kv_window": WINDOW})
    cache, queries, blocks, model = _case(seed, torch.float32)
    policy = build_policy(config, BS)
    sink = Observations(policy, config, PROMPT)
    row = RowObservation("r", 0, PROMPT, 0, (PROMPT - WINDOW, PROMPT), (0, 0), True, blocks, sink)
    step = EvictionStep(observe={0: row}, head_rows={}, table_rows={}, model=model)
    scoring = ScoringStep(block_tables={})  # the builder sent no table: the row must fail, not raise
    observe_rows_gpu(step, scoring, "model.layers.0.self_attn.attn", 0, queries[0], cache[0],
                     SplitHeadDimLayout(HKV, BS, D), H, D ** -0.5)
    assert sink.error is not None and not sink.scores
