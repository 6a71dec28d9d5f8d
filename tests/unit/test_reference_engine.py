"""The reference engine on the tiny random GQA Llama: exactness, real per-head caches, positions."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.reference.selection import blocks_to_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest

PROMPT_LEN = 160


@pytest.fixture(scope="module")
def prompt_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(10, 40000, (PROMPT_LEN,), generator=gen)


@pytest.fixture(scope="module")
def prefilled(tiny_engine, prompt_ids):
    return tiny_engine.prefill(prompt_ids)


def ragged_kept(num_layers: int, num_kv_heads: int, L: int) -> list[list[torch.Tensor]]:
    """A stand-in selection: sinks + a different stride and recent tail per KV head.

    The same per head in every layer, so that one 4D mask expresses it for the HF oracle.
    """
    rows = []
    for head in range(num_kv_heads):
        stride = 3 + 2 * head
        tail = 16 + 8 * head
        idx = torch.cat([torch.arange(4), torch.arange(4, L - tail, stride), torch.arange(L - tail, L)])
        rows.append(torch.unique(idx))
    return [list(rows) for _ in range(num_layers)]


def masked_hf_logits(model_dir, full_ids, L, kept_per_head, group, renumber_by=0):
    """Oracle: HF eager forward over prompt + later tokens, with evicted prompt tokens masked out
    for every query after the prompt (per KV head, shared by its query heads).

    ``renumber_by`` shifts the positions of the later tokens down (what a cache that renumbers
    kept tokens would do). Returns logits ``[S - L + 1, V]`` of positions ``L-1 .. S-1``.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    S = full_ids.shape[0]
    H = group * len(kept_per_head)
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool)).repeat(H, 1, 1)
    for head, idx in enumerate(kept_per_head):
        evicted = torch.ones(L, dtype=torch.bool)
        evicted[idx] = False
        for h in range(head * group, (head + 1) * group):
            allowed[h, L:, :L] &= ~evicted
    mask = torch.zeros(1, H, S, S).masked_fill(~allowed.unsqueeze(0), torch.finfo(torch.float32).min)
    positions = torch.arange(S)
    positions[L:] -= renumber_by
    with torch.no_grad():
        out = model(full_ids.view(1, -1), attention_mask=mask, position_ids=positions.view(1, -1))
    return out.logits[0, L - 1 :].float()


def test_full_cache_is_token_identical_to_hf_generate(tiny_engine, prompt_ids, prefilled):
    n = 120
    ours = tiny_engine.generate(prefilled, EvictionConfig(), n)
    hf = tiny_engine.model.generate(prompt_ids.view(1, -1), do_sample=False, max_new_tokens=n)[0, PROMPT_LEN:].tolist()
    assert ours.token_ids == hf
    assert ours.memory_fraction == 1.0
    assert ours.kept_per_head.eq(PROMPT_LEN).all()


def test_prefill_captures_the_models_own_cache(tiny_engine, prompt_ids, prefilled):
    with torch.no_grad():
        out = tiny_engine.model(prompt_ids.view(1, -1), use_cache=True)
    cache = out.past_key_values
    for layer in range(prefilled.num_layers):
        torch.testing.assert_close(prefilled.keys[layer], cache.layers[layer].keys[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefilled.values[layer], cache.layers[layer].values[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefilled.last_logits, out.logits[0, -1].float(), rtol=1e-4, atol=1e-4)


def test_layer_inputs_shapes_and_window_queries(tiny_engine, prompt_ids, prefilled):
    config = EvictionConfig(scorer="snapkv", budget=0.5, window=8, granularity="head")
    layers = tiny_engine.layer_inputs(prefilled, config)
    cfg = tiny_engine.model.config
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert len(layers) == cfg.num_hidden_layers
    # The window queries are the model's own post-RoPE queries of the last 8 positions.
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"]
        captured["pe"] = kwargs["position_embeddings"]

    handle = tiny_engine.model.model.layers[1].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        tiny_engine.model(prompt_ids.view(1, -1))
    handle.remove()
    attn = tiny_engine.model.model.layers[1].self_attn
    q = attn.q_proj(captured["hidden"]).view(1, PROMPT_LEN, H, d).transpose(1, 2)
    cos, sin = captured["pe"]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
    for li, inputs in enumerate(layers):
        assert inputs.keys.shape == (Hkv, PROMPT_LEN, d) and inputs.values.shape == (Hkv, PROMPT_LEN, d)
        assert inputs.queries.shape == (H, 8, d)
        assert inputs.queries_pre_rope.shape == (H, PROMPT_LEN, d)
        assert inputs.o_proj.shape == (cfg.hidden_size, H * d)
        assert inputs.rope_cos.shape[1] == d and inputs.layer_idx == li
        assert inputs.attention_sum is None
    torch.testing.assert_close(layers[1].queries, q_rot[0, :, -8:], rtol=1e-5, atol=1e-5)
    # The next-position tables rotate position L first.
    cos_l, _ = tiny_engine.parts.rope_tables(torch.tensor([PROMPT_LEN]))
    torch.testing.assert_close(layers[0].rope_cos[0], cos_l[0])


def test_h2o_attention_sum_counts_every_query(tiny_engine, prefilled):
    layers = tiny_engine.layer_inputs(prefilled, EvictionConfig(scorer="h2o", budget=0.5, granularity="head"))
    total = layers[0].attention_sum
    assert total.shape == (tiny_engine.parts.num_heads, PROMPT_LEN)
    # Each query's attention sums to 1, so the columns sum to the number of queries.
    torch.testing.assert_close(total.sum(dim=1), torch.full((tiny_engine.parts.num_heads,), float(PROMPT_LEN)))
    assert total[:, -1].lt(total[:, 0]).all()  # the last token is seen by one query only


def test_each_head_cache_holds_exactly_its_kept_tokens(tiny_engine, prefilled):
    kept = ragged_kept(prefilled.num_layers, prefilled.num_kv_heads, PROMPT_LEN)
    n = 10
    out = tiny_engine.generate(prefilled, EvictionConfig(scorer="snapkv", budget=0.5), n, stop_on_eos=False, kept=kept, return_cache=True)
    sizes = torch.tensor([[idx.numel() for idx in row] for row in kept])
    assert torch.equal(out.kept_per_head, sizes)
    assert len(set(sizes[0].tolist())) == prefilled.num_kv_heads  # really ragged
    assert out.memory_fraction == pytest.approx(float(sizes.sum()) / (sizes.numel() * PROMPT_LEN))
    fed = n - 1  # the last generated token is never fed back
    for layer, row in enumerate(out.cache.stores):
        for head, store in enumerate(row):
            idx = kept[layer][head]
            k = idx.numel()
            assert store.length == k + fed
            assert store.keys.shape == (k + fed, prefilled.keys[layer].shape[-1])
            assert torch.equal(store.keys[:k], prefilled.keys[layer][head, idx])
            assert torch.equal(store.values[:k], prefilled.values[layer][head, idx])
            assert torch.equal(store.positions, torch.cat([idx, torch.arange(PROMPT_LEN, PROMPT_LEN + fed)]))


def test_decoding_uses_true_positions(tiny_engine, tiny_llama_dir, prompt_ids, prefilled):
    kept = ragged_kept(prefilled.num_layers, prefilled.num_kv_heads, PROMPT_LEN)
    n = 6
    out = tiny_engine.generate(prefilled, EvictionConfig(scorer="snapkv", budget=0.5), n, stop_on_eos=False, kept=kept, return_logits=True)
    full_ids = torch.cat([prompt_ids, torch.tensor(out.token_ids[:-1])])
    group = tiny_engine.parts.group_size
    oracle = masked_hf_logits(tiny_llama_dir, full_ids, PROMPT_LEN, kept[0], group)
    torch.testing.assert_close(out.logits, oracle, rtol=1e-4, atol=1e-4)
    # A cache that renumbered its kept tokens would give new tokens smaller positions.
    renumbered = masked_hf_logits(tiny_llama_dir, full_ids, PROMPT_LEN, kept[0], group, renumber_by=PROMPT_LEN // 2)
    assert (renumbered[1:] - out.logits[1:]).abs().max() > 1e-2


def test_suffix_after_eviction_takes_true_positions(tiny_engine, tiny_llama_dir, prompt_ids, prefilled):
    kept = ragged_kept(prefilled.num_layers, prefilled.num_kv_heads, PROMPT_LEN)
    suffix = torch.tensor([101, 202, 303, 404, 505])
    out = tiny_engine.generate(prefilled, EvictionConfig(scorer="snapkv", budget=0.5), 4, stop_on_eos=False, kept=kept, suffix_ids=suffix, return_logits=True)
    full_ids = torch.cat([prompt_ids, suffix, torch.tensor(out.token_ids[:-1])])
    oracle = masked_hf_logits(tiny_llama_dir, full_ids, PROMPT_LEN, kept[0], tiny_engine.parts.group_size)
    torch.testing.assert_close(out.logits, oracle[suffix.numel() :], rtol=1e-4, atol=1e-4)


def test_one_prefill_serves_many_runs(tiny_engine, prefilled):
    before = [k.clone() for k in prefilled.keys]
    kept = ragged_kept(prefilled.num_layers, prefilled.num_kv_heads, PROMPT_LEN)
    first = tiny_engine.generate(prefilled, EvictionConfig(), 8, stop_on_eos=False, kept=kept)
    full = tiny_engine.generate(prefilled, EvictionConfig(), 8, stop_on_eos=False)
    again = tiny_engine.generate(prefilled, EvictionConfig(), 8, stop_on_eos=False, kept=kept)
    assert first.token_ids == again.token_ids
    assert first.memory_fraction < 1.0 == full.memory_fraction
    for k0, k1 in zip(before, prefilled.keys):
        assert torch.equal(k0, k1)


def test_blocks_to_tokens_covers_whole_blocks():
    tokens = blocks_to_tokens(torch.tensor([3, 0, 2]), 4, 14)
    assert tokens.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13]


def test_decode_interval_is_refused_where_it_is_not_supported():
    """Head granularity beyond its scorers and allocations, scorers whose statistics are not
    gathered during decode, and windows larger than the interval: a usage error naming the
    field and what is allowed."""
    from vllm_kvevict.config import EvictionConfigError

    assert EvictionConfig.from_fields(scorer="snapkv", budget=0.5, decode_interval=64).resolved_granularity == "head"
    with pytest.raises(EvictionConfigError, match="decode_interval=64: 0 with allocation 'pyramid' at granularity "
                                                  "'head'.*uniform, adakv, adakv_floor"):
        EvictionConfig.from_fields(scorer="pyramidkv", budget=0.5, decode_interval=64)
    for scorer in ("defensivekv", "laprox", "value_aware", "h2o"):
        with pytest.raises(EvictionConfigError, match=f"decode_interval=64: 0 with scorer '{scorer}' at granularity "
                                                      "'head'.*page granularity supports"):
            EvictionConfig.from_fields(scorer=scorer, budget=0.5, granularity="head", allocation="adakv",
                                       decode_interval=64)
    with pytest.raises(EvictionConfigError, match="kv_decode_interval=64: 0 with scorer 'criticalkv' and single tokens "
                                                  "per head.*whole pages per head"):
        EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_decode_interval": 64, "kv_head_selection": "token"})
    with pytest.raises(EvictionConfigError, match="kv_decode_interval=64: 0 with criticalkv over 'h2o' at granularity "
                                                  "'page'"):
        EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_criticalkv_base": "h2o", "kv_granularity": "page",
                                  "kv_decode_interval": 64})
    critical = EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_decode_interval": 64})  # head, adakv
    critical.check_block_size(32)  # whole pages per head at 32 tokens
    with pytest.raises(EvictionConfigError, match="decode_interval=64.*block size is 128"):
        critical.check_block_size(128)  # single tokens per head: refused
    EvictionConfig.from_flat({"kv_eviction": "criticalkv", "kv_decode_interval": 64,
                              "kv_head_selection": "page"}).check_block_size(128)
    EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_decode_interval": 64}).check_block_size(128)
    for scorer in ("expected_attention", "lkv"):
        with pytest.raises(EvictionConfigError, match=f"kv_decode_interval=64: 0 with scorer '{scorer}'"):
            EvictionConfig.from_flat({"kv_eviction": scorer, "kv_granularity": "page", "kv_decode_interval": 64})
    with pytest.raises(EvictionConfigError, match="kv_decode_interval=16: an integer >= the window \\(32\\)"):
        EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_granularity": "page", "kv_decode_interval": 16})
    with pytest.raises(EvictionConfigError, match="kv_prompt_eviction='off': 'on' unless decode_interval > 0"):
        EvictionConfig.from_flat({"kv_eviction": "snapkv", "kv_prompt_eviction": "off"})
    config = EvictionConfig.from_flat({"kv_eviction": "knorm", "kv_granularity": "page", "kv_decode_interval": 64,
                                       "kv_prompt_eviction": "off"})
    assert config.evicts_during_decode and not config.evicts_prompt
