"""Continuing a reference generation on its own cache (forced tokens, then greedy again)."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import EvictionConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one torch thread: see conftest

PROMPT_LEN = 40
DECODING = EvictionConfig(scorer="snapkv", granularity="page", budget=48, window=8, decode_interval=16,
                          prompt_eviction="off")


@pytest.fixture(scope="module")
def prefilled(tiny_engine):
    ids = torch.randint(10, 40000, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3))
    return tiny_engine.prefill(ids)


def evictions(gen_or_continued) -> list[tuple[int, list[int]]]:
    return [(e.seq_len, e.evicted) for e in gen_or_continued.decode_evictions]


@pytest.mark.parametrize("config", [EvictionConfig(), DECODING], ids=["full", "decode-eviction"])
def test_no_forced_tokens_is_the_uninterrupted_generation(tiny_engine, prefilled, config):
    whole = tiny_engine.generate(prefilled, config, 90, stop_on_eos=False)
    first = tiny_engine.generate(prefilled, config, 30, stop_on_eos=False, return_state=True)
    rest = tiny_engine.continue_generation(first.state, [], 60, stop_on_eos=False)
    assert first.token_ids + rest.token_ids == whole.token_ids
    assert evictions(first) + evictions(rest) == evictions(whole)
    if config.evicts_during_decode:
        assert len(evictions(whole)) >= 4  # the interval count carried across the split


def test_forced_tokens_are_run_as_if_chosen(tiny_engine, prefilled):
    """Forcing the tokens the model would have chosen anyway changes nothing."""
    whole = tiny_engine.generate(prefilled, DECODING, 100, stop_on_eos=False)
    first = tiny_engine.generate(prefilled, DECODING, 30, stop_on_eos=False, return_state=True)
    forced = whole.token_ids[30:55]
    rest = tiny_engine.continue_generation(first.state, forced, 45, stop_on_eos=False)
    assert rest.token_ids == whole.token_ids[55:]
    assert evictions(first) + evictions(rest) == evictions(whole)
    assert any(40 + 30 <= e.seq_len <= 40 + 55 for e in rest.decode_evictions)  # one fell among the forced


def test_forced_tokens_enter_the_cache_at_their_positions(tiny_engine, prefilled):
    first = tiny_engine.generate(prefilled, EvictionConfig(), 10, stop_on_eos=False, return_state=True)
    assert (first.state.pending, first.state.position) == (first.token_ids[-1], PROMPT_LEN + 9)
    forced = [101, 202, 303]
    rest = tiny_engine.continue_generation(first.state, forced, 5, stop_on_eos=False)
    store = rest.state.cache.stores[0][0]
    held = PROMPT_LEN + 10 + len(forced) + 4  # prompt, 10 generated, forced, 5 new (the last not run)
    assert torch.equal(store.positions, torch.arange(held))
    assert rest.state.position == held and rest.state.pending == rest.token_ids[-1]
    # what the continuation wrote equals a full-cache prefill of the same tokens, then greedy
    ids = torch.cat([prefilled.input_ids, torch.tensor(first.token_ids + forced)])
    again = tiny_engine.generate(tiny_engine.prefill(ids), EvictionConfig(), 5, stop_on_eos=False)
    assert again.token_ids == rest.token_ids
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_engine.continue_generation(rest.state, [], 0)
