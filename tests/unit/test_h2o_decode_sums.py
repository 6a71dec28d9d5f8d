"""h2o during decode (page granularity): its attention sums accumulate over every query run.

The shared function against a direct computation; the decode window's running sums (start from
the prompt's kept tokens, one column per new token, the evicted blocks' columns dropped); the
worker on a real vLLM CPU cache (prompt kept whole or evicted, then decode steps through the
real observation code) against sums computed query by query; the reference engine's sums
against a full-cache prefill of everything it ran.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_vllm_layouts import BS, D, G, HKV, cpu_cache
from test_vllm_worker_side import LAYERS, MODEL, _receive, _row, _side

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies.attention_sums import attention_paid
from vllm_kvevict.policies.ops import group_mean
from vllm_kvevict.vllm.channel import Admission
from vllm_kvevict.vllm.step import DecodeWindow
from vllm_kvevict.vllm.worker.requests import OBSERVING, PAGE

SCALE = D ** -0.5


def direct_sums(queries: torch.Tensor, query_positions: list[int], keys: torch.Tensor,
                key_positions: list[int], scale: float) -> torch.Tensor:
    """``[H, T]``: query by query, head by head, softmax over the keys at positions <= its own."""
    heads, hkv = queries.shape[0], keys.shape[0]
    total = torch.zeros(heads, keys.shape[1], dtype=torch.float64)
    for h in range(heads):
        k = keys[h // (heads // hkv)].double()
        for i, p in enumerate(query_positions):
            seen = torch.tensor([kp <= p for kp in key_positions])
            logits = (k[seen] @ queries[h, i].double()) * scale
            weights = torch.exp(logits - logits.max())
            total[h, seen] += weights / weights.sum()
    return total.float()


def test_attention_paid_is_every_querys_causal_softmax_summed_per_key():
    torch.manual_seed(0)
    heads, hkv, length, n = 6, 2, 40, 7
    keys = torch.randn(hkv, length, 16)
    queries = torch.randn(heads, n, 16)
    got = attention_paid(queries, keys, 0.3)  # the last n keys' queries
    want = direct_sums(queries, list(range(length - n, length)), keys, list(range(length)), 0.3)
    assert torch.allclose(got, want, atol=1e-5)
    got = attention_paid(queries, keys, 0.3, first=5)  # a prefill chunk at positions 5 .. 11
    want = direct_sums(queries, list(range(5, 5 + n)), keys, list(range(length)), 0.3)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.sum(1), torch.full((heads,), float(n)))  # each query's weights sum to 1
    with pytest.raises(ValueError, match="do not fit"):
        attention_paid(queries, keys, 0.3, first=length - n + 1)


def test_the_window_accumulates_then_drops_the_evicted_blocks_columns():
    torch.manual_seed(1)
    heads, hkv, bs, prompt = 4, 2, 4, 10
    keys = torch.randn(hkv, 20, 8)
    prompt_sums = torch.rand(heads, prompt)
    window = DecodeWindow(4)
    kept = torch.tensor([0, 1, 2, 3, 8, 9])  # block 1 evicted with the prompt
    window.start_sums({0: prompt_sums}, kept)
    assert torch.equal(window.attention_sum[0], prompt_sums[:, kept])
    held = kept.tolist()
    for p in range(10, 14):  # four decode tokens
        held.append(p)
        q = torch.randn(heads, 1, 8)
        before = window.attention_sum[0]
        window.add_attention(0, q, keys[:, held], 0.5)
        step = direct_sums(q, [p], keys[:, held], held, 0.5)
        assert torch.allclose(window.attention_sum[0], torch.cat([before, torch.zeros(heads, 1)], 1) + step, atol=1e-6)
    sums = window.attention_sum[0]  # held: blocks 0, 2, 3 (positions 0-3, 8-11, 12-13)
    window.drop_blocks([1], bs)  # the second held block (positions 8 .. 11)
    assert torch.equal(window.attention_sum[0], torch.cat([sums[:, :4], sums[:, 8:]], 1))
    with pytest.raises(RuntimeError, match="cover 6 held tokens, expected 9"):
        window.add_attention(0, torch.randn(heads, 1, 8), keys[:, :10], 0.5)
    with pytest.raises(RuntimeError, match="no attention sums"):
        DecodeWindow(4).add_attention(0, q, keys, 0.5)


PROMPT, DECODE = 96, 16


def _h2o_config(**flat) -> EvictionConfig:
    return EvictionConfig.from_flat({"kv_eviction": "h2o", "kv_granularity": "page", "kv_budget": 40,
                                     "kv_window": 8, "kv_decode_interval": DECODE, **flat})


@pytest.mark.parametrize("prompt_eviction", ["off", "on"])
def test_worker_sums_every_query_run_and_scores_h2o_with_them(prompt_eviction):
    """The real observation code on a real vLLM CPU cache: the prompt's queries (prefill), then
    16 decode queries; the scoring step's h2o scores are the group means of sums computed query
    by query over what is held, and the evicted blocks' sums are gone after."""
    from vllm_kvevict.vllm.backends.decode_observe import observe_decode_rows
    from vllm_kvevict.vllm.backends.observe import observe_rows

    torch.manual_seed(2)
    total = PROMPT + DECODE + 1
    keys, values = torch.randn(total, HKV, D), torch.randn(total, HKV, D)  # the stock kernel's writes, ahead
    table = torch.arange(1, 1 + math.ceil(total / BS), dtype=torch.int32)
    caches, layout = {}, None
    for i in range(LAYERS):
        kv, layout = cpu_cache(keys + i, values - i, table, num_blocks=48)
        caches[f"model.layers.{i}.self_attn.attn"] = kv
    side = _side(caches)
    config = _h2o_config(kv_prompt_eviction=prompt_eviction)
    _receive(side, {"r": Admission(config, PROMPT, 1)})
    queries = torch.randn(total, HKV * G, D)

    def forward(first: int, n: int, observe) -> None:
        step = side.current_step()
        q = queries[first : first + n].reshape(n, -1)
        for i, (name, kv) in enumerate(caches.items()):
            observe(step, name, i, q, kv, layout, HKV * G, SCALE)

    side.plan([_row("r", 0, PROMPT, blocks=table)], MODEL)
    state = side.table.get("r")
    assert state.status == OBSERVING and side.current_step().observe[0].score == (prompt_eviction == "on")
    forward(0, PROMPT, observe_rows)
    side.finish()
    assert state.status == PAGE
    evicted = state.evicted.tolist()
    assert bool(evicted) == (prompt_eviction == "on")
    held = [p for p in range(PROMPT) if p // BS not in evicted]
    q_heads = queries.transpose(0, 1)  # [H, total, d]
    for i in range(LAYERS):
        k = (keys + i).transpose(0, 1)
        want = direct_sums(q_heads[:, :PROMPT], list(range(PROMPT)), k[:, :PROMPT], list(range(PROMPT)), SCALE)
        assert torch.allclose(state.decode.attention_sum[i], want[:, held], atol=1e-5)
    for n in range(DECODE):
        side.plan([_row("r", PROMPT + n, 1, blocks=table)], MODEL)
        assert side.current_step().decode[0].score == (n == DECODE - 1)
        forward(PROMPT + n, 1, observe_decode_rows)
        done = side.finish()
        assert not done.decode_failed
        held.append(PROMPT + n)
    record = side.recorder.decode["r"][0]
    seq_len = PROMPT + DECODE
    assert record["seq_len"] == seq_len and record["evicted"]
    sums = []
    for i in range(LAYERS):
        k = (keys + i).transpose(0, 1)
        want = direct_sums(q_heads[:, :PROMPT], list(range(PROMPT)), k[:, :PROMPT], list(range(PROMPT)), SCALE)
        want = torch.cat([want[:, [p for p in held if p < PROMPT]], torch.zeros(HKV * G, DECODE)], 1)
        want += direct_sums(q_heads[:, PROMPT:seq_len], list(range(PROMPT, seq_len)), k[:, held], held, SCALE)
        sums.append(want)
        assert torch.allclose(record["scores"][i].values, group_mean(want, HKV), atol=1e-5)
    gone = set(record["evicted"])
    kept = [j for j, p in enumerate(held) if p // BS not in gone]
    for i in range(LAYERS):
        assert torch.allclose(state.decode.attention_sum[i], sums[i][:, kept], atol=1e-5)
    side.plan([_row("r", seq_len, 1, blocks=table)], MODEL)  # the next step adds one column
    forward(seq_len, 1, observe_decode_rows)
    side.finish()
    assert state.decode.attention_sum[0].shape == (HKV * G, len(kept) + 1)


def test_a_prompt_kept_whole_whose_sums_failed_is_left_whole():
    from vllm_kvevict.vllm.worker.requests import WHOLE

    side = _side()
    _receive(side, {"r": Admission(_h2o_config(kv_prompt_eviction="off"), PROMPT, 1)})
    side.plan([_row("r", 0, PROMPT)], MODEL)
    done = side.finish()  # no forward: no sums
    assert side.table.get("r").status == WHOLE
    assert done.decode_failed == {"r": ("h2o", "page", "scoring")}


def test_h2o_decode_is_page_granularity_only():
    from vllm_kvevict.config import EvictionConfigError

    assert _h2o_config().evicts_during_decode
    with pytest.raises(EvictionConfigError, match="decode_interval=16: 0 with scorer 'h2o' at granularity 'head'.*"
                                                  "page granularity supports.*h2o"):
        _h2o_config(kv_granularity="head")


def test_reference_sums_equal_a_full_prefill_of_everything_run(tiny_engine, one_torch_thread):
    """The reference loop, prompt kept and nothing evicted: at every interval the h2o scores are
    the group means of the attention sums a full-cache prefill of the tokens run so far gives."""
    torch.manual_seed(3)
    prompt = torch.randint(100, 5000, (48,))
    prefilled = tiny_engine.prefill(prompt)
    config = EvictionConfig.from_flat({"kv_eviction": "h2o", "kv_granularity": "page", "kv_budget": 32,
                                       "kv_window": 8, "kv_decode_interval": 16, "kv_prompt_eviction": "off"})
    gen = tiny_engine.generate(prefilled, config, 40, stop_on_eos=False, block_size=16, decode_choices=lambda i, e: [])
    assert len(gen.decode_evictions) == 2
    for e in gen.decode_evictions:
        run = torch.cat([prompt, torch.tensor(gen.token_ids[: e.seq_len - 48])])
        full = tiny_engine.prefill(run)
        for layer, scores in enumerate(e.scores):
            want = group_mean(full.attention_sum(layer), full.num_kv_heads)
            assert torch.allclose(scores.values, want, atol=1e-4, rtol=1e-4), (e.seq_len, layer)


def test_h2o_protects_the_recent_half_of_the_budget_of_the_whole_length():
    """Decode-time eviction scores the held tokens of a longer request: the recent half is
    ``budget(seq_len) // 2``, not a share of the held count."""
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.policies.base import LayerInputs
    from vllm_kvevict.policies.scorers.h2o import h2o

    scorer = h2o(EvictionConfig.from_flat({"kv_eviction": "h2o", "kv_budget": 0.25, "kv_window": 4,
                                           "kv_min_tokens": 0}))
    held = 40
    inputs = dict(keys=torch.randn(1, held, 8), values=torch.randn(1, held, 8), queries=torch.randn(2, 4, 8),
                  attention_sum=torch.rand(2, held))
    assert int(scorer.score(LayerInputs(**inputs)).protected.sum()) == 5  # 0.25 * 40 // 2
    assert int(scorer.score(LayerInputs(**inputs, budget_len=128)).protected.sum()) == 16  # 0.25 * 128 // 2
