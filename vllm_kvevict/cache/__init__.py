"""Head-wise compaction groundwork (pure torch, no vLLM): block counts, head-page tables, copies.

* :mod:`.blocks`: ``K`` compact blocks from the budget alone; where the positional tail starts.
* :mod:`.page_table`: head-pages of each (layer, KV head) and the copy lists of a compaction.
* :mod:`.compact`: the checked copy list of a compaction, the copy on a head-major cache, its reader.
* :mod:`.copies`: every layer's checked copy list at once, whole pages split off (once per request).
* :mod:`.accounting`: blocks a request holds against the ideal.

Layout and bounds: docs/HEAD_PAGES.md.
"""

from vllm_kvevict.cache.accounting import HeldBlocks, held_blocks, ideal_blocks, memory_efficiency
from vllm_kvevict.cache.blocks import (
    LayerBudgetBound,
    TailLayout,
    compact_blocks_needed,
    head_pages_bound,
    layer_budget_bounds,
    prompt_tail_layout,
    simple_compact_blocks_bound,
)
from vllm_kvevict.cache.compact import compact_layer, copy_indices, gather_compact, pack_key_pairs, unpack_key_pairs
from vllm_kvevict.cache.page_table import (
    CompactionPlan,
    CompactRegionOverflow,
    KeyOnlyGather,
    KeyOnlyPlan,
    LayerGather,
    assign_head_pages,
    kept_positions_tensor,
    page_table_tensor,
    plan_compaction,
)

__all__ = [
    "CompactRegionOverflow",
    "CompactionPlan",
    "HeldBlocks",
    "KeyOnlyGather",
    "KeyOnlyPlan",
    "LayerBudgetBound",
    "LayerGather",
    "TailLayout",
    "assign_head_pages",
    "compact_blocks_needed",
    "compact_layer",
    "copy_indices",
    "gather_compact",
    "head_pages_bound",
    "held_blocks",
    "ideal_blocks",
    "kept_positions_tensor",
    "layer_budget_bounds",
    "memory_efficiency",
    "pack_key_pairs",
    "page_table_tensor",
    "plan_compaction",
    "prompt_tail_layout",
    "simple_compact_blocks_bound",
    "unpack_key_pairs",
]
