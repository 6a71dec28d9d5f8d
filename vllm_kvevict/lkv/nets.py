"""The two learned parts of LKV, as torch modules (pure torch: training and serving share them).

* :class:`TokenScorer` (LKV-T): a query-agnostic worth of every cached token of one
  (layer, KV head), from that token's key and value (and its relative position), how far they
  point from the head's mean key and value (KeyDiff's contrast, which the scorer starts from),
  and a short depthwise convolution along the tokens so that a span scores together. Keys are
  de-rotated first (the RoPE tables are part of the artifact), so a key's own features do not
  depend on where it sits.
* :class:`HeadShares` (LKV-H): each KV head's share of its layer's budget, from a learned head
  embedding and the budget; the shares of a layer sum to 1.

Shapes: ``Nl`` layers, ``Hkv`` KV heads, ``L`` tokens, ``d`` head dim, ``F = 2 d + 6`` features.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NetShape:
    """Sizes of the two modules (recorded in the artifact).

    Attributes
    ----------
    num_layers, num_kv_heads, head_dim : the model's attention geometry.
    rank : hidden features per (layer, KV head) of the token scorer.
    kernel : width of its convolution along tokens (odd).
    embed, hidden : head embedding size and hidden width of the share predictor.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    rank: int = 8
    kernel: int = 7
    embed: int = 8
    hidden: int = 16

    @property
    def features(self) -> int:
        return 2 * self.head_dim + len(SCALAR_FEATURES)

    def to_dict(self) -> dict:
        return asdict(self)


#: The features after the unit pre-RoPE key and unit value, in order. ``keydiff_cos`` is
#: ``cos(k_j, mean_i k_i / |k_i|)`` on the cached (post-RoPE) keys: minus KeyDiff's score.
SCALAR_FEATURES = ("log_key_norm", "log_value_norm", "relative_position", "keydiff_cos", "key_contrast_cos",
                   "value_contrast_cos")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half``: ``[x1, x2] -> [-x2, x1]`` along the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate_keys(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """Pre-RoPE keys from cached ``keys [..., L, d]`` at ``positions [L]`` (or any shape
    broadcasting with ``keys.shape[:-1]``; HF ``rotate_half`` convention, ``cos, sin`` tables
    scaled by ``scaling``)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return (keys * cos - rotate_half(keys) * sin) / scaling


def token_features(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """``[..., L, F]``: unit pre-RoPE key and unit value (times ``sqrt d``), then
    :data:`SCALAR_FEATURES`: their log norms, the relative position ``pos / max(pos)``, and the
    cosine of the cached key, the pre-RoPE key and the value to their head's mean unit vector.

    Parameters
    ----------
    keys, values : ``[..., L, d]`` float32 (keys post-RoPE, as cached).
    positions : ``[L]`` int64 logical positions.
    """
    pre = unrotate_keys(keys.float(), positions, inv_freq, scaling)
    values = values.float()
    dim = keys.shape[-1]
    k_norm = torch.linalg.vector_norm(pre, dim=-1, keepdim=True).clamp_min(1e-6)
    v_norm = torch.linalg.vector_norm(values, dim=-1, keepdim=True).clamp_min(1e-6)
    rel = positions.to(torch.float32) / max(int(positions.max()), 1) if positions.numel() else positions.float()
    rel = rel.view(*([1] * (keys.dim() - 2)), -1, 1).expand(*keys.shape[:-1], 1)
    scale = math.sqrt(dim)
    contrast = [_mean_cosine(x) for x in (keys.float(), pre, values)]
    return torch.cat((pre / k_norm * scale, values / v_norm * scale, k_norm.log(), v_norm.log(), rel, *contrast), dim=-1)


def _mean_cosine(x: torch.Tensor) -> torch.Tensor:
    """``[..., L, 1]``: ``cos(x_j, mean_i x_i / |x_i|)`` (KeyDiff's anchor, on any vectors)."""
    anchor = F.normalize(x, p=2, dim=-1).mean(dim=-2, keepdim=True)
    return F.cosine_similarity(x, anchor, dim=-1)[..., None]


class TokenScorer(nn.Module):
    """LKV-T: ``score[g, j]`` of one layer's tokens from their own key and value.

    ``h = gelu(x W1[l, g] + b1[l, g])`` (``[L, rank]``), ``h = h + conv_j(h)`` (depthwise along
    tokens, zero padding), ``score = h . w2[l, g] + x . u[l, g]``. At initialisation ``w2 = 0``
    and ``u`` picks ``-keydiff_cos``: the scorer starts as KeyDiff.
    """

    def __init__(self, shape: NetShape, inv_freq: torch.Tensor, rope_scaling: float = 1.0):
        super().__init__()
        if shape.kernel % 2 != 1:
            raise ValueError(f"kernel must be odd, got {shape.kernel}")
        self.shape = shape
        n, h, f, r = shape.num_layers, shape.num_kv_heads, shape.features, shape.rank
        self.w1 = nn.Parameter(torch.randn(n, h, f, r) / math.sqrt(f))
        self.b1 = nn.Parameter(torch.zeros(n, h, r))
        self.conv = nn.Parameter(torch.zeros(n, h, r, shape.kernel))
        self.w2 = nn.Parameter(torch.zeros(n, h, r))
        skip = torch.zeros(n, h, f)
        skip[..., 2 * shape.head_dim + SCALAR_FEATURES.index("keydiff_cos")] = -1.0
        self.skip = nn.Parameter(skip)
        self.register_buffer("inv_freq", inv_freq.detach().to(torch.float32).clone())
        self.rope_scaling = float(rope_scaling)

    def hidden(self, features: torch.Tensor, layers: slice | int) -> torch.Tensor:
        """``features [n, Hkv, L, F]`` of layers ``layers`` -> scores ``[n, Hkv, L]``."""
        w1, b1 = self.w1[layers], self.b1[layers]
        conv, w2, skip = self.conv[layers], self.w2[layers], self.skip[layers]
        n, heads, length, _ = features.shape
        h = F.gelu(torch.einsum("nglf,ngfr->nglr", features, w1) + b1[:, :, None, :])
        channels = h.permute(0, 1, 3, 2).reshape(1, n * heads * self.shape.rank, length)
        weight = conv.reshape(n * heads * self.shape.rank, 1, self.shape.kernel)
        mixed = F.conv1d(channels, weight, padding=self.shape.kernel // 2, groups=weight.shape[0])
        h = h + mixed.reshape(n, heads, self.shape.rank, length).permute(0, 1, 3, 2)
        return torch.einsum("nglr,ngr->ngl", h, w2) + torch.einsum("nglf,ngf->ngl", features, skip)

    def features(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return token_features(keys, values, positions, self.inv_freq, self.rope_scaling)

    def forward(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[Hkv, L]`` float32 scores of layer ``layer_idx`` (``keys, values [Hkv, L, d]``)."""
        feats = self.features(keys, values, positions)[None]
        return self.hidden(feats, slice(layer_idx, layer_idx + 1))[0]


class HeadShares(nn.Module):
    """LKV-H: ``shares[l, g]``, each KV head's share of its layer's budget, for a budget.

    ``logit[l, g] = mlp([e[l, g], log b])``; ``shares[l] = softmax_g(logit[l])``. At
    initialisation every head gets ``1 / Hkv`` (the last layer starts at zero).
    """

    def __init__(self, shape: NetShape):
        super().__init__()
        self.shape = shape
        self.embed = nn.Parameter(torch.randn(shape.num_layers, shape.num_kv_heads, shape.embed) * 0.1)
        self.fc1 = nn.Linear(shape.embed + 1, shape.hidden)
        self.fc2 = nn.Linear(shape.hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, budget_fraction: float | torch.Tensor) -> torch.Tensor:
        """``[Nl, Hkv]`` float32 shares (rows sum to 1) for ``budget_fraction`` in ``(0, 1]``."""
        b = torch.as_tensor(budget_fraction, dtype=torch.float32).clamp(1e-4, 1.0).log()
        n, h, _ = self.embed.shape
        x = torch.cat((self.embed, b.expand(n, h, 1)), dim=-1)
        logits = self.fc2(F.gelu(self.fc1(x)))[..., 0]
        return torch.softmax(logits, dim=-1)
