"""What a compacted request holds, against the ideal, in blocks.

Held: ``K`` compact blocks (:func:`~vllm_kvevict.cache.blocks.compact_blocks_needed`) plus its
positional tail blocks (:meth:`~vllm_kvevict.cache.blocks.TailLayout.tail_blocks`). Ideal
(EVALUATION.md, same rule as the page-granular manager): ``ceil(budget * prompt_blocks)``, with
``budget`` the kept fraction of the prompt (raised to ``min_tokens`` where the floor binds), plus the blocks the generated tokens need on their
own. Memory efficiency = ideal / held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_kvevict.cache.blocks import compact_blocks_needed, prompt_tail_layout
from vllm_kvevict.config import EvictionConfig


@dataclass(frozen=True)
class HeldBlocks:
    """Blocks one request holds after head-wise compaction (same ids in every layer)."""

    compact: int
    tail: int

    @property
    def total(self) -> int:
        return self.compact + self.tail


def held_blocks(
    config: EvictionConfig,
    prompt_len: int,
    seq_len: int,
    block_size: int,
    num_layers: int,
    num_kv_heads: int,
) -> HeldBlocks:
    """Blocks held by a request compacted after ``prompt_len`` tokens, now at ``seq_len`` tokens."""
    compact = compact_blocks_needed(config, prompt_len, block_size, num_layers, num_kv_heads)
    return HeldBlocks(compact=compact, tail=prompt_tail_layout(prompt_len, block_size).tail_blocks(seq_len))


def ideal_blocks(config: EvictionConfig, prompt_len: int, seq_len: int, block_size: int) -> int:
    """``ceil(B / bs) + ceil((seq_len - P) / bs)``, ``B = config.budget_tokens(P)`` the tokens a
    KV head keeps: EVALUATION.md's ``budget x prompt_blocks`` counted in the tokens actually kept,
    so a prompt's partly filled last block is not counted as a whole kept block."""
    generated = max(0, seq_len - prompt_len)
    return math.ceil(config.budget_tokens(prompt_len) / block_size) + math.ceil(generated / block_size)


def memory_efficiency(
    config: EvictionConfig,
    prompt_len: int,
    seq_len: int,
    block_size: int,
    num_layers: int,
    num_kv_heads: int,
) -> float:
    """``ideal_blocks / held_blocks.total`` (1.0 for an empty request)."""
    held = held_blocks(config, prompt_len, seq_len, block_size, num_layers, num_kv_heads).total
    return ideal_blocks(config, prompt_len, seq_len, block_size) / held if held else 1.0
