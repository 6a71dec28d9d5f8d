"""A tiny random Llama with GQA, saved as a Hugging Face folder, for fast and exact checks.

It borrows the real model's tokenizer (so vLLM and transformers can both load it) and draws
random weights from a fixed seed: the same arguments give the same model on any CPU. (Weights are
uniform draws scaled by exact elementwise ops: torch's float32 ``normal_`` takes a vectorised
path only on some instruction sets, so its bytes depended on the CPU.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

#: Half-width of the uniform weight init (standard deviation 0.08).
TINY_INIT_HALF_WIDTH = 0.08 * 3 ** 0.5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_tiny_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    num_layers: int = 2,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 256,
    max_position_embeddings: int = 8192,
    seed: int = 0,
) -> Path:
    """Write a random ``LlamaForCausalLM`` to ``out_dir`` (kept if already there) and return it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    marker = out / ".tiny-llama"
    spec = f"{num_layers}-{num_heads}-{num_kv_heads}-{head_dim}-{intermediate_size}-{seed}-uniform"
    if marker.exists() and marker.read_text() == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=num_heads * head_dim,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so attention is peaked and greedy outputs are not degenerate:
    # uniform on [-a, a] with a = 0.08 * sqrt(3), i.e. standard deviation 0.08.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                draw = torch.rand(param.shape, generator=gen, dtype=torch.float32)
                param.copy_((draw * 2 - 1) * TINY_INIT_HALF_WIDTH)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copy(src, out / name)
    marker.write_text(spec)
    return out
