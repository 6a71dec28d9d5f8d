"""VECTOR's regression (moments, ridge, held-out R^2), its artifact, and the calibration command
on the tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.lkv.nets import unrotate_keys
from vllm_kvevict.reference.model_parts import apply_rope
from vllm_kvevict.vector import VectorArtifactError, artifact_for, load_artifact, save_artifact
from vllm_kvevict.vector.artifact import ARTIFACT_DIR, VectorArtifact
from vllm_kvevict.vector.regression import Moments, augment


def test_moments_recover_an_exact_affine_map_and_equal_lstsq(seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 400, 8, generator=g, dtype=torch.float64)
    true_w = torch.randn(2, 9, 8, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(2, 400, 8, generator=g, dtype=torch.float64)
    values = augment(keys) @ true_w + noise
    m = Moments.zeros((2,), 8)
    m.add(keys[:, :250], values[:, :250])  # in two chunks: streaming equals one batch
    m.add(keys[:, 250:], values[:, 250:])
    w = m.solve(ridge=0.0)
    lstsq = torch.linalg.lstsq(augment(keys), values).solution
    assert torch.allclose(w, lstsq, atol=1e-8)
    residual = ((augment(keys) @ w - values) ** 2).sum(dim=(-1, -2))
    total = ((values - values.mean(dim=1, keepdim=True)) ** 2).sum(dim=(-1, -2))
    assert torch.allclose(m.r2(w), 1 - residual / total, atol=1e-9)
    exact = Moments.zeros((2,), 8)
    exact.add(keys, augment(keys) @ true_w)
    assert torch.allclose(exact.r2(exact.solve(ridge=1e-9)), torch.ones(2, dtype=torch.float64), atol=1e-7)


def _artifact(identity: ModelIdentity, seed: int, derotate) -> VectorArtifact:
    g = torch.Generator().manual_seed(seed)
    d = identity.head_dim
    shape = (identity.num_layers, identity.num_kv_heads)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    return VectorArtifact(identity, torch.randn(shape + (d + 1, d), generator=g),
                          torch.tensor(derotate).view(shape), torch.rand(shape + (2,)), inv_freq)


def test_reconstruction_undoes_rope_where_chosen(seed):
    identity = ModelIdentity("LlamaForCausalLM", 1, 4, 2, 16, "x")
    art = _artifact(identity, seed, [[True, False]])
    g = torch.Generator().manual_seed(seed + 1)
    plain = torch.randn(2, 5, 16, generator=g)
    positions = torch.tensor([0, 3, 7, 100, 2000])
    angles = positions.float()[:, None] * art.inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cached = apply_rope(plain, angles.cos(), angles.sin())
    rebuilt = art.reconstruct(0, cached, positions)
    w = art.weight[0]
    assert torch.allclose(rebuilt[0], plain[0] @ w[0, :-1] + w[0, -1], atol=1e-4)  # head 0: RoPE undone
    assert torch.allclose(rebuilt[1], cached[1] @ w[1, :-1] + w[1, -1], atol=1e-5)  # head 1: the cached key
    assert torch.allclose(unrotate_keys(cached, positions, art.inv_freq, 1.0), plain, atol=1e-4)
    values = torch.randn(2, 5, 16, generator=g)
    assert torch.allclose(art.residuals(0, cached, values, positions), ((values - rebuilt) ** 2).sum(-1))


def test_artifact_round_trip_and_refusal_for_another_model(tmp_path, seed):
    identity = ModelIdentity("LlamaForCausalLM", 2, 4, 2, 8, "abc")
    art = _artifact(identity, seed, [[True, False], [False, True]])
    path = save_artifact(tmp_path / "v.safetensors", identity, art.weight, art.derotate, art.r2, art.inv_freq,
                         calibration={"sequences": 3})
    loaded = artifact_for(identity, path)
    assert torch.equal(loaded.weight, art.weight) and torch.equal(loaded.derotate, art.derotate)
    assert loaded.calibration == {"sequences": 3}
    other = ModelIdentity("LlamaForCausalLM", 2, 4, 2, 8, "def")
    with pytest.raises(VectorArtifactError, match="kv_vector_artifact=.*config_hash"):
        artifact_for(other, path)
    with pytest.raises(VectorArtifactError, match="no packaged VECTOR artifact .*vector.calibrate"):
        artifact_for(other)
    with pytest.raises(VectorArtifactError, match="needs the model"):
        artifact_for(None)


def test_the_packaged_artifact_is_found_for_smollm2(smollm2_dir):
    identity = ModelIdentity.from_hf_config(json.loads((smollm2_dir / "config.json").read_text()))
    art = artifact_for(identity)
    assert art.path.parent == ARTIFACT_DIR
    assert tuple(art.weight.shape) == (30, 3, 65, 64)
    assert art.calibration["tokens"]["held_out"] > 0


def test_calibration_on_the_tiny_llama(tiny_vector_artifact, tiny_llama_dir):
    art = load_artifact(tiny_vector_artifact)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert art.identity == ModelIdentity.from_hf_config(config)
    assert tuple(art.weight.shape) == (2, 2, 33, 32) and tuple(art.r2.shape) == (2, 2, 2)
    chosen = torch.where(art.derotate, art.r2[..., 1], art.r2[..., 0])
    assert torch.equal(chosen, art.r2.max(dim=-1).values)  # chosen by held-out R^2
    assert torch.isfinite(art.r2).all() and (art.r2 <= 1).all()
    assert art.calibration["tokens"] == {"fit": 192, "held_out": 192}
    table = tiny_vector_artifact.with_suffix(".md").read_text()
    assert "| layer |" in table and "RoPE undone in" in table


def test_random_kind_draws_ordinary_token_ids(tiny_llama_dir):
    """``--kinds random``: exactly ``length`` ids, none special, the same for the same seed and
    index, other ones for another index (the serving check calibrates its word-level model so)."""
    from transformers import AutoTokenizer

    from vllm_kvevict.vector.calibrate import RANDOM_TOKENS, sequence_ids

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    first = sequence_ids(tok, 0, 300, 0, (RANDOM_TOKENS,))
    assert len(first) == 300 and not set(first) & set(tok.all_special_ids)
    assert max(first) < len(tok) and len(set(first)) > 250
    assert sequence_ids(tok, 0, 300, 0, (RANDOM_TOKENS,)) == first
    assert sequence_ids(tok, 1, 300, 0, (RANDOM_TOKENS,)) != first
