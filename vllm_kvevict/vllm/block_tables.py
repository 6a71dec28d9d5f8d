"""Block tables and sequence lengths as vLLM's kernel must see them after eviction.

Page granularity: a row that evicted pages keeps its kept blocks in order, then its tail, and
its length shrinks by ``evicted * block_size`` (keys are stored post-RoPE, so attention over the
kept tokens is the stock kernel over this shorter sequence). Head granularity: the stock kernel
sees the positional tail only (the backend then replaces that row's output). Either way the rows
are computed on the CPU when the step is planned (:func:`page_row`, :func:`tail_row`) and written
here into the step's metadata (:func:`rewrite`); slot mappings (cache writes) were computed from
the positional table before, so writes stay positional.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from vllm_kvevict.vllm.step import TableRow


def page_row(block_ids: torch.Tensor, seq_len: int, evicted: torch.Tensor, block_size: int) -> TableRow:
    """The row of a page-evicted request: ``block_ids`` (its positional row) without the
    ``evicted`` positional block indices, and its shorter length."""
    used = min(block_ids.numel(), -(-seq_len // block_size))
    keep = torch.ones(used, dtype=torch.bool)
    keep[evicted[evicted < used]] = False
    return TableRow(block_ids[:used][keep].to(torch.int32), seq_len - int((~keep).sum()) * block_size)


def tail_row(block_ids: torch.Tensor, seq_len: int, first_tail_block: int, block_size: int) -> TableRow:
    """The row of a compacted request as the stock kernel sees it: its tail blocks only."""
    used = min(block_ids.numel(), -(-seq_len // block_size))
    return TableRow(block_ids[first_tail_block:used].to(torch.int32), seq_len - first_tail_block * block_size)


def rewrite(common_attn_metadata: Any, rows: Mapping[int, TableRow]) -> Any:
    """A copy of vLLM's ``CommonAttentionMetadata`` whose ``block_table_tensor`` and ``seq_lens``
    (and CPU upper bound, where vLLM has one) hold ``rows``; the input is not modified."""
    cm = common_attn_metadata
    rows = {r: t for r, t in rows.items() if r < cm.num_reqs}
    if not rows:
        return cm
    table, lens = cm.block_table_tensor.clone(), cm.seq_lens.clone()
    index = torch.tensor(sorted(rows), dtype=torch.long)
    width = table.shape[1]
    new_rows = torch.zeros(len(rows), width, dtype=table.dtype)
    new_lens = torch.tensor([rows[int(r)].seq_len for r in index], dtype=lens.dtype)
    for i, r in enumerate(index.tolist()):
        ids = rows[r].block_ids[:width]
        new_rows[i, : ids.numel()] = ids.to(table.dtype)
    table[index.to(table.device)] = new_rows.to(table.device)
    lens[index.to(lens.device)] = new_lens.to(lens.device)
    changes = {"block_table_tensor": table, "seq_lens": lens}
    upper = getattr(cm, "seq_lens_cpu_upper_bound", None)
    if upper is not None:
        upper = upper.clone()
        upper[index] = new_lens.to(upper.dtype)
        changes["seq_lens_cpu_upper_bound"] = upper
    if lens.device.type == "cpu":
        changes["max_seq_len"] = int(lens[: cm.num_reqs].max()) if cm.num_reqs else cm.max_seq_len
    return dataclasses.replace(cm, **changes)
