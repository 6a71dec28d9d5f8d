"""VECTOR in the reference engine: per-head caches holding whole and key-only tokens.

A key-only token keeps its cached key and its position; its value is the artifact's
reconstruction ``[k', 1] @ W[l, g]`` of that key (RoPE undone at the position where the
calibration chose that). The reference writes the reconstruction into the token's value row
when the cache is built: the key and the position never change afterwards, so this is the value
an attention kernel rebuilding it from the key at every step computes (the plugin's key-only
head-pages, docs/VECTOR.md), computed once. Decoded tokens are always whole.
"""

from __future__ import annotations

import torch

from vllm_kvevict.reference.head_cache import HeadCache
from vllm_kvevict.vector.artifact import VectorArtifact

KeptIndices = list[list[torch.Tensor]]


def merged(whole: KeptIndices, key_only: KeptIndices) -> KeptIndices:
    """Per (layer, head) the sorted union of whole and key-only positions (disjoint sets)."""
    return [[torch.sort(torch.cat((w, k))).values for w, k in zip(rw, rk)] for rw, rk in zip(whole, key_only)]


def routed_values(keys: list[torch.Tensor], values: list[torch.Tensor], key_only: KeptIndices,
                  artifact: VectorArtifact) -> list[torch.Tensor]:
    """Per layer ``[Hkv, L, d]``: ``values`` with every key-only token's value replaced by its
    reconstruction from ``keys`` (post-RoPE, at positions ``0 .. L-1``)."""
    out = []
    for layer, (layer_keys, layer_values) in enumerate(zip(keys, values)):
        L = layer_keys.shape[1]
        mask = torch.zeros(layer_keys.shape[:2], dtype=torch.bool)
        for head, idx in enumerate(key_only[layer]):
            mask[head, idx.to(torch.long)] = True
        if not bool(mask.any()):
            out.append(layer_values)
            continue
        rebuilt = artifact.reconstruct(layer, layer_keys, torch.arange(L)).to(layer_values.dtype)
        out.append(torch.where(mask[..., None], rebuilt, layer_values))
    return out


def entry_values(artifact: VectorArtifact, layer: int, keys: torch.Tensor, heads: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """``[M, d]`` float32: the values :func:`routed_values` gives key-only tokens, for ``M`` of
    them given one by one: entry ``m`` is KV head ``heads[m]``'s cached key ``keys[m]`` at
    ``positions[m]`` (the plugin's key-only head-pages rebuild their values with this at every
    attention step). Same maths: :meth:`VectorArtifact.reconstruct`, every entry through its
    own head's regression."""
    num_kv_heads = int(artifact.weight.shape[1])
    rebuilt = artifact.reconstruct(layer, keys.expand(num_kv_heads, -1, -1), positions)
    return rebuilt[heads.to(torch.long), torch.arange(keys.shape[0])]


def routed_cache(keys: list[torch.Tensor], values: list[torch.Tensor], whole: KeptIndices, key_only: KeptIndices,
                 artifact: VectorArtifact, reserve: int = 0) -> HeadCache:
    """A :class:`HeadCache` of the whole and key-only tokens (the latter with rebuilt values)."""
    return HeadCache.from_kept(keys, routed_values(keys, values, key_only, artifact), merged(whole, key_only),
                               reserve=reserve)
