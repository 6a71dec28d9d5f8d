"""The selector's decision on one prefilled prompt, as the plugin would make it, with the ranks
the diagnostic needs: kept tokens per (layer, KV head), decision units (:mod:`.diagnose_slots`),
each head's token ranks, and the window-attention ranks that say whether evidence was visible.

Scores, plans and kept sets come from the same :class:`~vllm_kvevict.policies.Policy` calls
:func:`vllm_kvevict.reference.selection.select_kept_set` makes, so the kept set is the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.evaluation.diagnose_slots import KeptIndices, Unit, slot_kept
from vllm_kvevict.policies import build_policy, page_scores, rank, run_scores
from vllm_kvevict.policies.pages import required_blocks
from vllm_kvevict.reference.selection import blocks_to_tokens


@dataclass
class Decision:
    """What one config keeps of one prompt.

    Attributes
    ----------
    kept : ``kept[layer][kv_head]`` sorted int64 positions.
    units : the decision units; ``slot_kind`` says what their slots are.
    token_rank : per layer ``[Hkv, L]``, the selector's token ranks (0 first).
    protected : per layer ``[Hkv, L]`` bool, tokens the contract always keeps.
    attention_rank : per layer ``[Hkv, L]``, SnapKV window-attention ranks (same window and pooling).
    """

    kept: KeptIndices
    units: list[Unit]
    slot_kind: str
    token_rank: list[torch.Tensor]
    protected: list[torch.Tensor]
    attention_rank: list[torch.Tensor]

    def kept_masks(self, prompt_len: int) -> list[torch.Tensor]:
        """Per layer ``[Hkv, L]`` bool."""
        masks = []
        for row in self.kept:
            mask = torch.zeros(len(row), prompt_len, dtype=torch.bool)
            for h, idx in enumerate(row):
                mask[h, idx] = True
            masks.append(mask)
        return masks


def _block_rank(block_scores: torch.Tensor, required: torch.Tensor) -> torch.Tensor:
    """``[N]`` ranks of blocks: required first, then by score descending, ties to the lower index."""
    by_score = torch.sort(block_scores.double(), descending=True, stable=True).indices
    order = by_score[torch.sort(required[by_score].to(torch.int8), descending=True, stable=True).indices]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def decide(prefilled, config: EvictionConfig, block_size: int) -> Decision:
    """The :class:`Decision` of ``config`` (a budget below the prompt; VECTOR is refused)."""
    if config.keeps_everything or not config.evicts_prompt:
        raise ValueError("budget: the diagnostic needs a config that evicts (a budget below 1)")
    if config.vector == "on":
        raise ValueError("vector: 'off' (the diagnostic swaps whole tokens; VECTOR's key-only route is not a slot)")
    L = prefilled.prompt_len
    policy = build_policy(config, block_size, model=prefilled.model)
    layers = prefilled.layer_inputs(config)
    scores = [policy.score_layer(x) for x in layers]
    token_rank = [rank(s) for s in scores]
    protected = [s.protected for s in scores]
    snap = build_policy(EvictionConfig(scorer="snapkv", budget=0.5, window=config.window, pooling=config.pooling,
                                       pooling_kernel=config.pooling_kernel, sinks=config.resolved_sinks), block_size)
    attention_rank = [rank(snap.scorer.score(x)) for x in prefilled.layer_inputs(snap.config)]
    if config.resolved_granularity == "page":
        evicted = set(policy.evicted_blocks(scores, L))
        num_blocks = -(-L // block_size)
        blocks = torch.tensor([b for b in range(num_blocks) if b not in evicted], dtype=torch.long)
        tokens = blocks_to_tokens(blocks, block_size, L)
        kept = [[tokens for _ in range(prefilled.num_kv_heads)] for _ in range(prefilled.num_layers)]
        required = required_blocks(L, block_size, config)
        kept_mask = torch.zeros(num_blocks, dtype=torch.bool)
        kept_mask[blocks] = True
        units = [Unit(None, None, _block_rank(page_scores(scores, block_size), required), required, kept_mask, block_size)]
        return Decision(kept, units, "page", token_rank, protected, attention_rank)
    kept = [[idx.to(torch.long) for idx in row] for row in policy.plan_head(scores, L).indices]
    if config.head_selection_for(block_size) == "page":
        runs = [run_scores(s, block_size) for s in scores]
        units = [
            Unit(l, h, rank(runs[l])[h], runs[l].protected[h], slot_kept(kept[l][h], block_size, L), block_size)
            for l in range(len(kept)) for h in range(len(kept[l]))
        ]
        return Decision(kept, units, "head_page", token_rank, protected, attention_rank)
    units = [
        Unit(l, h, token_rank[l][h], protected[l][h], slot_kept(kept[l][h], 1, L), 1)
        for l in range(len(kept)) for h in range(len(kept[l]))
    ]
    return Decision(kept, units, "token", token_rank, protected, attention_rank)
