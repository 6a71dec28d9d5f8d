"""Small fakes for the LKV tests: a model identity from a config dict, and a random artifact."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_kvevict.lkv.artifact import save_artifact
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.lkv.nets import HeadShares, NetShape, TokenScorer


def fake_config(num_layers: int = 3, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8, **extra) -> dict:
    """An HF-style config dict of a small Llama."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
            "hidden_size": num_heads * head_dim, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            **extra}


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Default RoPE frequencies ``theta ** (-2i / d)``."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def random_artifact(path: Path, identity: ModelIdentity, seed: int = 0, theta: float = 10000.0) -> Path:
    """An artifact for ``identity`` whose every parameter is a uniform draw (unequal shares, scores
    unlike KeyDiff's); float32 draws are exact elementwise ops, the same bytes on any CPU."""
    shape = NetShape(identity.num_layers, identity.num_kv_heads, identity.head_dim)
    scorer, shares = TokenScorer(shape, rope_inv_freq(identity.head_dim, theta)), HeadShares(shape)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (scorer, shares):
            for param in module.parameters():
                param.copy_((torch.rand(param.shape, generator=generator) - 0.5) * 2.0)
    return save_artifact(path, identity, scorer, shares, {"fake": True, "seed": seed})
