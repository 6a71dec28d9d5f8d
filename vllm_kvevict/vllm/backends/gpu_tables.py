"""The block table and sequence lengths vLLM's GPU kernels read, in buffers the builder owns.

The step's :class:`~vllm_kvevict.vllm.step.TableRow` s are computed on the CPU when the step is
planned (:mod:`vllm_kvevict.vllm.block_tables`). Here they reach the device without a
device-to-host copy: the runner's table and lengths are copied device-to-device into persistent
buffers (``[rows, width]`` int32 and ``[rows]`` int32, grown when a batch needs more), and the
rewritten rows are sent in one host-to-device copy from pinned memory (non-blocking; the
caching host allocator keeps the pinned block until the copy ran) and scattered in. The CPU
upper bounds FlashAttention and Triton read (``seq_lens_cpu_upper_bound``, 0.26's
``_seq_lens_cpu``, ``max_seq_len``) are rewritten on the CPU to match.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from vllm_kvevict.vllm.step import TableRow


def staging(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor to fill and send to ``device``: pinned when ``device`` is CUDA."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")


def send(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (from :func:`staging`) on ``device``, without waiting for the device."""
    return host.to(device, non_blocking=True)


def grown(buffer: Optional[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
          device: torch.device, fill: int = 0) -> torch.Tensor:
    """``buffer`` if every dim already holds ``shape``, else a larger one (old contents kept,
    each dim at least doubled so that growth is rare)."""
    if buffer is not None and all(have >= want for have, want in zip(buffer.shape, shape)):
        return buffer
    old = tuple(buffer.shape) if buffer is not None else (0,) * len(shape)
    size = tuple(max(want, 2 * have) if want > have else have for have, want in zip(old, shape))
    new = torch.full(size, fill, dtype=dtype, device=device)
    if buffer is not None:
        new[tuple(slice(0, n) for n in old)] = buffer
    return new


class StepTables:
    """Persistent ``block_table`` / ``seq_lens`` buffers of one metadata builder."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.table: Optional[torch.Tensor] = None  # [rows, width] int32
        self.seq_lens: Optional[torch.Tensor] = None  # [rows] int32

    def rewrite(self, cm: Any, rows: Mapping[int, TableRow]) -> Any:
        """A copy of vLLM's ``CommonAttentionMetadata`` whose ``block_table_tensor`` and ``seq_lens``
        are views of this builder's buffers holding ``rows`` (CPU upper bounds to match); ``cm``
        itself is not modified. ``cm`` unchanged if no row is in the batch."""
        rows = {r: t for r, t in rows.items() if r < cm.num_reqs}
        if not rows:
            return cm
        src_table, src_lens = cm.block_table_tensor, cm.seq_lens
        n, width = src_table.shape
        self.table = grown(self.table, (n, width), src_table.dtype, self.device)
        self.seq_lens = grown(self.seq_lens, (src_lens.shape[0],), src_lens.dtype, self.device)
        table, lens = self.table[:n, :width], self.seq_lens[: src_lens.shape[0]]
        table.copy_(src_table, non_blocking=True)
        lens.copy_(src_lens, non_blocking=True)

        index = sorted(rows)
        ids = pad_sequence([rows[r].block_ids[:width].to(torch.int32) for r in index], batch_first=True)
        cols = max(1, ids.shape[1])
        new_lens = torch.tensor([rows[r].seq_len for r in index], dtype=torch.int32)
        host = staging((len(index), 2 + cols), torch.int32, self.device)
        host.zero_()
        host[:, 0] = torch.tensor(index, dtype=torch.int32)
        host[:, 1] = new_lens
        host[:, 2 : 2 + ids.shape[1]] = ids
        dev = send(host, self.device)
        where = dev[:, 0].long()
        table[:, :cols].index_copy_(0, where, dev[:, 2:].to(table.dtype))
        lens.index_copy_(0, where, dev[:, 1].to(lens.dtype))
        changes: dict[str, Any] = {"block_table_tensor": table, "seq_lens": lens}
        cpu_index = torch.tensor(index, dtype=torch.long)
        for name in ("seq_lens_cpu_upper_bound", "_seq_lens_cpu"):  # the latter: vLLM 0.26's deprecated field
            upper = getattr(cm, name, None)
            if upper is not None:
                upper = upper.clone()
                upper[cpu_index] = new_lens.to(upper.dtype)
                changes[name] = upper
        upper = changes.get("seq_lens_cpu_upper_bound")
        if upper is not None and cm.num_reqs:
            changes["max_seq_len"] = int(upper[: cm.num_reqs].max())
        return dataclasses.replace(cm, **changes)
