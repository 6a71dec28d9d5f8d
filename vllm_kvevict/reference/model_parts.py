"""The pieces of an HF Llama-family causal LM that a hand-written forward pass needs.

:class:`DecoderParts` wraps a loaded ``*ForCausalLM`` and exposes one layer's steps separately
(projections, RoPE, the part after attention) so that the reference engine can run attention
itself over its own per-head caches. Every step reuses the model's own modules, so the numbers
are the model's numbers.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half``: ``[x1, x2] -> [-x2, x1]`` along the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, d]`` by the tables ``cos, sin [T, d]`` (HF convention)."""
    return x * cos + rotate_half(x) * sin


class DecoderParts:
    """One model's layers, split into the steps around attention.

    Shapes: ``T`` tokens of one sequence (no batch dim), ``D`` hidden size, ``H`` query heads,
    ``Hkv`` KV heads, ``d`` head dim.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = inner.layers
        self.final_norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attn.head_dim
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.group_size = self.num_heads // self.num_kv_heads
        self.scale = float(attn.scaling)
        self.dtype = next(model.parameters()).dtype

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [T, d]`` for the given logical positions ``[T]`` (model's RoPE type)."""
        probe = torch.empty(1, dtype=self.dtype)
        cos, sin = self.rotary(probe, positions.view(1, -1))
        return cos[0], sin[0]

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[T] -> [T, D]``."""
        return self.embed(token_ids)

    def project(self, layer_idx: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalise ``hidden [T, D]`` and project it: pre-RoPE ``q [H, T, d]``, ``k [Hkv, T, d]``, ``v``."""
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        t = x.shape[0]
        q = attn.q_proj(x).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(t, self.num_kv_heads, self.head_dim).transpose(0, 1)
        return q, k, v

    def finish(self, layer_idx: int, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP: ``attn_out [H, T, d]`` -> next hidden ``[T, D]``."""
        layer = self.layers[layer_idx]
        t = attn_out.shape[1]
        merged = attn_out.transpose(0, 1).reshape(t, self.num_heads * self.head_dim)
        hidden = residual + layer.self_attn.o_proj(merged)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[T, D] -> [T, V]`` float32."""
        return self.lm_head(self.final_norm(hidden)).float()

    def o_proj_weight(self, layer_idx: int) -> torch.Tensor:
        """``[D, H * d]``."""
        return self.layers[layer_idx].self_attn.o_proj.weight
