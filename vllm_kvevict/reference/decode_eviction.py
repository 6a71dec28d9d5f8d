"""Decode-time eviction in the reference engine: greedy decoding whose held tokens are scored
again and evicted back to the budget every ``decode_interval`` tokens (page and head granularity).

The served plugin does the same (docs/DECODE_EVICTION.md), call for call:

* a request's *held* tokens are whole positional blocks in order (the kept ones), every block
  full but the last (page eviction only drops full blocks before the one being written);
* after the token at position ``p`` was run (its K/V appended, the next token's logits computed
  over the held tokens), if ``p + 1 - decode_from >= decode_interval`` (``decode_from``: the
  length at the last eviction, the prompt's length at first) the held tokens are scored with
  ``policy.score_layer`` (window: the post-RoPE queries of the last ``window`` tokens run, all
  generated since the last eviction as ``decode_interval >= window``), and
  ``policy.evicted_blocks(scores, held_len, budget=config.budget_tokens(p + 1))`` names the held
  blocks to drop: a fractional budget keeps that share of the request's whole length so far, a
  token budget is a fixed cap;
* the next token is run over what is left; RoPE positions keep counting from the true position;
* h2o: the held tokens' attention sums (the prompt's, of the kept tokens) gain every run token's
  attention over the held tokens (:func:`~vllm_kvevict.policies.attention_sums.attention_paid`,
  the plugin's function), are the scorer's ``attention_sum``, and lose the evicted tokens' columns.

Head granularity: each (layer, KV head) holds its own tokens (its kept set, then every token run
since); they are scored head by head and planned on their positions
(:func:`~vllm_kvevict.policies.held.held_layer_scores`, :func:`~vllm_kvevict.policies.held.plan_held`,
the plugin's two calls), and every store keeps its head's kept positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vllm_kvevict.policies import LayerScores, build_policy
from vllm_kvevict.policies.attention_sums import attention_paid
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.policies.held import held_layer_scores, plan_held
from vllm_kvevict.reference.forward import greedy_loop, run_tokens
from vllm_kvevict.reference.head_cache import HeadCache
from vllm_kvevict.reference.model_parts import DecoderParts


@dataclass
class DecodeEviction:
    """One decode-time eviction.

    Attributes
    ----------
    seq_len : tokens of the request so far (the budget's length).
    held_blocks : positional block indices held before it, in order.
    evicted : positional block indices it evicted, sorted (page granularity).
    scores : per layer, the ``[Hkv, held_len]`` scores of the held tokens (head granularity:
        ``[Hkv, seq_len]`` on positions, ``-inf`` where a head holds nothing).
    held, kept : head granularity: ``[layer][kv_head]`` positions held before it and kept after.
    """

    seq_len: int
    held_blocks: list[int]
    evicted: list[int]
    scores: list[LayerScores]
    held: Optional[list[list[torch.Tensor]]] = None
    kept: Optional[list[list[torch.Tensor]]] = None

    @property
    def held_len(self) -> int:
        return int(self.scores[0].values.shape[1]) if self.scores else 0


#: ``choose(index, eviction) -> evicted positional blocks`` (head granularity: the kept positions
#: ``[layer][kv_head]``): forces the choice of the ``index``-th eviction (e.g. the served
#: plugin's), given what the policy computed.
Chooser = Callable[[int, DecodeEviction], list[int]]


class DecodeEvictor:
    """The decode-time eviction of one generation."""

    def __init__(self, parts: DecoderParts, config, block_size: int, decode_from: int, model=None,
                 choose: Optional[Chooser] = None):
        self.parts, self.config, self.block_size = parts, config, block_size
        self.policy = build_policy(config, block_size, model=model)
        self.decode_from = decode_from
        self.choose = choose
        self.window: list[list[torch.Tensor]] = [[] for _ in range(parts.num_layers)]
        self.evictions: list[DecodeEviction] = []
        #: h2o: per layer ``[H, held]`` attention paid to each held token by every query run so far.
        self.attention_sum: Optional[list[torch.Tensor]] = None

    def start_sums(self, cache: HeadCache, prompt_sums: list[torch.Tensor]) -> None:
        """h2o: the prompt's sums ``[H, L]`` (every prompt query's) of the tokens ``cache`` holds."""
        self.attention_sum = [s[:, cache.stores[layer][0].positions].float() for layer, s in enumerate(prompt_sums)]

    def run(self, cache: HeadCache, token: int, position: int) -> torch.Tensor:
        """Run ``token`` at ``position``, then evict if the interval is reached; its logits ``[V]``."""
        queries: list[torch.Tensor] = []
        logits = run_tokens(self.parts, cache, torch.tensor([token]), torch.tensor([position]), queries)[0]
        for layer, q in enumerate(queries):
            if self.attention_sum is not None:  # h2o: the new query's attention over the held tokens
                keys = torch.stack([st.keys for st in cache.stores[layer]])
                sums = self.attention_sum[layer]
                sums = torch.cat([sums, sums.new_zeros(sums.shape[0], q.shape[1])], dim=1)
                self.attention_sum[layer] = sums + attention_paid(q, keys, self.parts.scale)
            ring = self.window[layer]
            ring.append(q)
            del ring[: max(0, len(ring) - self.config.window)]
        seq_len = position + 1
        if seq_len - self.decode_from >= self.config.decode_interval:
            self.evict(cache, seq_len)
            self.decode_from = seq_len
        return logits

    def evict(self, cache: HeadCache, seq_len: int) -> None:
        if self.config.resolved_granularity == "head":
            self.evict_heads(cache, seq_len)
            return
        bs = self.block_size
        positions = cache.stores[0][0].positions
        held_len = int(positions.numel())
        scores = [self.policy.score_layer(self._inputs(cache, layer, seq_len)) for layer in range(cache.num_layers)]
        budget = self.config.budget_tokens(seq_len)
        chosen = self.policy.evicted_blocks(scores, held_len, budget=budget)
        held_blocks = (positions[::bs] // bs).tolist()
        eviction = DecodeEviction(seq_len, held_blocks, [held_blocks[i] for i in chosen], scores)
        if self.choose is not None:
            eviction.evicted = sorted(int(b) for b in self.choose(len(self.evictions), eviction))
        self.evictions.append(eviction)
        drop = torch.isin(positions // bs, torch.tensor(eviction.evicted, dtype=torch.long))
        if drop.any():
            cache.keep_rows(~drop)
            if self.attention_sum is not None:
                self.attention_sum = [sums[:, ~drop] for sums in self.attention_sum]

    def evict_heads(self, cache: HeadCache, seq_len: int) -> None:
        """Head granularity: each (layer, KV head) keeps its planned positions among those it holds."""
        if self.config.budget_tokens(seq_len) >= seq_len:
            return  # a budget of the whole length keeps everything (the plugin orders nothing)
        held = [[s.positions.clone() for s in row] for row in cache.stores]
        scores = []
        for layer, row in enumerate(cache.stores):
            scores.append(held_layer_scores(
                self.policy, [s.keys for s in row], [s.values for s in row], held[layer],
                torch.cat(self.window[layer], dim=1), seq_len, layer_idx=layer, num_layers=cache.num_layers,
                scale=self.parts.scale,
                o_proj=self.parts.o_proj_weight(layer).detach() if self.policy.needs.o_proj else None))
        kept = plan_held(self.policy, scores, seq_len, held).indices
        eviction = DecodeEviction(seq_len, [], [], scores, held=held, kept=kept)
        if self.choose is not None:
            eviction.kept = [[torch.as_tensor(k, dtype=torch.long) for k in row]
                             for row in self.choose(len(self.evictions), eviction)]
        self.evictions.append(eviction)
        for row, kept_row in zip(cache.stores, eviction.kept):
            for store, k in zip(row, kept_row):
                store.keep_rows(torch.isin(store.positions, k))

    def _inputs(self, cache: HeadCache, layer: int, seq_len: int) -> LayerInputs:
        stores = cache.stores[layer]
        return LayerInputs(
            keys=torch.stack([s.keys for s in stores]).float(),
            values=torch.stack([s.values for s in stores]).float(),
            queries=torch.cat(self.window[layer], dim=1).float(),
            positions=stores[0].positions.clone(),
            o_proj=self.parts.o_proj_weight(layer).detach(),
            layer_idx=layer,
            num_layers=cache.num_layers,
            scale=self.parts.scale,
            attention_sum=self.attention_sum[layer] if self.attention_sum is not None else None,
            budget_len=seq_len,
        )


def check_same_positions(cache: HeadCache) -> None:
    """Page granularity holds the same positions in every (layer, KV head)."""
    first = cache.stores[0][0].positions
    for row in cache.stores:
        for store in row:
            if not torch.equal(store.positions, first):
                raise ValueError("decode-time eviction needs page granularity (the same tokens in every head)")


@torch.no_grad()
def greedy_decode_evicting(evictor: DecodeEvictor, cache: HeadCache, logits: torch.Tensor, position: int,
                           max_new_tokens: int, stop_ids: frozenset[int]) -> tuple[list[int], torch.Tensor]:
    """:func:`~vllm_kvevict.reference.forward.greedy_decode` with ``evictor`` running every token."""
    if evictor.config.resolved_granularity != "head":
        check_same_positions(cache)
    return greedy_loop(lambda token, at: evictor.run(cache, token, at), logits, position, max_new_tokens, stop_ids)
