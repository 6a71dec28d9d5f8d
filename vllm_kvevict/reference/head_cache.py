"""A KV cache with one variable-length store per (layer, KV head).

Each store holds only the tokens its head keeps: post-RoPE keys, values and each token's
logical position. No masks: an evicted token has no slot anywhere. Stores are pre-sized for the
tokens still to come, so appending a decoded token writes one row in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadStore:
    """Kept tokens of one (layer, KV head): rows ``[:length]`` of the buffers are live.

    Attributes
    ----------
    key_buf, value_buf : ``[capacity, d]``.
    position_buf : ``[capacity]`` int64 logical positions.
    length : live rows.
    """

    key_buf: torch.Tensor
    value_buf: torch.Tensor
    position_buf: torch.Tensor
    length: int

    @property
    def keys(self) -> torch.Tensor:
        return self.key_buf[: self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.value_buf[: self.length]

    @property
    def positions(self) -> torch.Tensor:
        return self.position_buf[: self.length]

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Write ``keys, values [T, d]`` at ``positions [T]`` after the live rows (grows if full)."""
        t = keys.shape[0]
        if self.length + t > self.key_buf.shape[0]:
            self._grow(self.length + t)
        end = self.length + t
        self.key_buf[self.length : end] = keys
        self.value_buf[self.length : end] = values
        self.position_buf[self.length : end] = positions
        self.length = end

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the live rows where ``keep [length]`` (bool) is true, in order."""
        idx = torch.nonzero(keep, as_tuple=False).view(-1)
        n = int(idx.numel())
        for name in ("key_buf", "value_buf", "position_buf"):
            buf = getattr(self, name)
            buf[:n] = buf[: self.length].index_select(0, idx)
        self.length = n

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.key_buf.shape[0])
        for name in ("key_buf", "value_buf", "position_buf"):
            old = getattr(self, name)
            new = old.new_empty((capacity,) + tuple(old.shape[1:]))
            new[: self.length] = old[: self.length]
            setattr(self, name, new)


class HeadCache:
    """``stores[layer][kv_head]``: one :class:`HeadStore` per (layer, KV head)."""

    def __init__(self, stores: list[list[HeadStore]]):
        self.stores = stores

    @classmethod
    def from_kept(
        cls,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        kept: list[list[torch.Tensor]],
        reserve: int = 0,
    ) -> "HeadCache":
        """Copy the kept tokens of a prefilled prompt into fresh per-head stores.

        Parameters
        ----------
        keys, values : per layer ``[Hkv, L, d]`` (post-RoPE keys), left untouched.
        kept : ``kept[layer][kv_head]`` sorted int64 indices into ``0 .. L-1``; a token's index
            is its logical position.
        reserve : extra rows to pre-size for tokens appended later.
        """
        stores = []
        for layer_keys, layer_values, layer_kept in zip(keys, values, kept):
            row = []
            for head, idx in enumerate(layer_kept):
                idx = idx.to(torch.long)
                n = idx.numel()
                d = layer_keys.shape[-1]
                key_buf = layer_keys.new_empty(n + reserve, d)
                value_buf = layer_values.new_empty(n + reserve, d)
                position_buf = torch.empty(n + reserve, dtype=torch.long)
                key_buf[:n] = layer_keys[head].index_select(0, idx)
                value_buf[:n] = layer_values[head].index_select(0, idx)
                position_buf[:n] = idx
                row.append(HeadStore(key_buf, value_buf, position_buf, n))
            stores.append(row)
        return cls(stores)

    @property
    def num_layers(self) -> int:
        return len(self.stores)

    @property
    def num_kv_heads(self) -> int:
        return len(self.stores[0])

    def lengths(self) -> torch.Tensor:
        """``[num_layers, Hkv]`` live tokens per store."""
        return torch.tensor([[s.length for s in row] for row in self.stores], dtype=torch.long)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep the rows where ``keep`` is true in every store (page granularity: every store
        holds the same positions, ``keep [length]`` bool)."""
        for row in self.stores:
            for store in row:
                store.keep_rows(keep)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append ``keys, values [Hkv, T, d]`` at ``positions [T]`` to every head of ``layer``."""
        for head, store in enumerate(self.stores[layer]):
            store.append(keys[head], values[head], positions)
