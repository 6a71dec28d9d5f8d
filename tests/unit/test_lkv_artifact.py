"""The LKV artifact: identity, header, round trip, refusals, and the packaged SmolLM2 artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lkv_fakes import fake_config, random_artifact

from vllm_kvevict.lkv.artifact import (
    ARTIFACT_DIR,
    FORMAT,
    LKVArtifactError,
    artifact_for,
    load_artifact,
    packaged_artifacts,
    read_header,
)
from vllm_kvevict.lkv.identity import ModelIdentity

PACKAGED = ARTIFACT_DIR / "SmolLM2-135M-Instruct.safetensors"


def test_identity_reads_the_geometry_and_hashes_only_architecture_fields():
    identity = ModelIdentity.from_hf_config(fake_config())
    assert (identity.architecture, identity.num_layers, identity.num_heads, identity.num_kv_heads,
            identity.head_dim) == ("LlamaForCausalLM", 3, 4, 2, 8)
    assert ModelIdentity.from_hf_config(fake_config(torch_dtype="bfloat16", _name_or_path="x")) == identity
    wider = ModelIdentity.from_hf_config(fake_config(intermediate_size=999))
    assert wider.config_hash != identity.config_hash
    assert ModelIdentity.from_json(identity.to_json()) == identity


def test_identity_refuses_a_config_without_the_decoder_fields():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelIdentity.from_hf_config({"hidden_size": 8, "num_attention_heads": 2})


def test_round_trip_keeps_scores_shares_and_header(tmp_path):
    identity = ModelIdentity.from_hf_config(fake_config())
    path = random_artifact(tmp_path / "a.safetensors", identity, seed=1)
    header = read_header(path)
    assert header["format"] == FORMAT and header["version"] == "1"
    assert json.loads(header["model"])["num_kv_heads"] == 2
    artifact = artifact_for(identity, path)
    assert artifact.identity == identity and artifact.training == {"fake": True, "seed": 1}
    keys, values = torch.randn(2, 50, 8), torch.randn(2, 50, 8)
    scores = artifact.token_scores(2, keys, values, torch.arange(50))
    assert scores.shape == (2, 50) and scores.dtype == torch.float32
    again = load_artifact(random_artifact(tmp_path / "b.safetensors", identity, seed=1))
    assert torch.equal(scores, again.token_scores(2, keys, values, torch.arange(50)))
    shares = artifact.head_shares(0.2)
    assert shares.shape == (3, 2) and torch.allclose(shares.sum(-1), torch.ones(3))
    assert not torch.allclose(shares, torch.full_like(shares, 0.5)), "random shares are unequal"


def test_an_artifact_for_another_model_is_refused_naming_what_differs(tmp_path):
    path = random_artifact(tmp_path / "a.safetensors", ModelIdentity.from_hf_config(fake_config()))
    other = ModelIdentity.from_hf_config(fake_config(num_layers=4))
    with pytest.raises(LKVArtifactError) as info:
        artifact_for(other, path)
    message = str(info.value)
    assert "kv_lkv_artifact=" in message and "num_layers: 3 != 4" in message and "config_hash" in message


def test_missing_malformed_and_other_version_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    identity = ModelIdentity.from_hf_config(fake_config())
    with pytest.raises(LKVArtifactError, match="no such file"):
        artifact_for(identity, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LKVArtifactError, match="not a safetensors file"):
        artifact_for(identity, tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(LKVArtifactError, match="format 'something'"):
        artifact_for(identity, tmp_path / "other.safetensors")
    header = read_header(random_artifact(tmp_path / "a.safetensors", identity))
    tensors = {"x": torch.zeros(1)}
    save_file(tensors, str(tmp_path / "v0.safetensors"), metadata={**header, "version": "0"})
    with pytest.raises(LKVArtifactError, match="artifact version '0'.*version 1"):
        artifact_for(identity, tmp_path / "v0.safetensors")


def test_no_model_and_no_packaged_artifact_are_clear_errors():
    with pytest.raises(LKVArtifactError, match="needs the model"):
        artifact_for(None)
    with pytest.raises(LKVArtifactError, match="no packaged LKV artifact .* kv_lkv_artifact"):
        artifact_for(ModelIdentity.from_hf_config(fake_config()))


def test_the_packaged_smollm2_artifact_is_found_for_that_model_and_small(smollm2_dir):
    identity = ModelIdentity.from_hf_config(json.loads((smollm2_dir / "config.json").read_text()))
    assert PACKAGED in packaged_artifacts()
    artifact = artifact_for(identity)
    assert artifact.path == PACKAGED.resolve() and artifact.identity == identity
    assert PACKAGED.stat().st_size < 1_000_000
    assert artifact.training.get("steps_done", 0) > 0


def test_setup_ships_the_packaged_artifacts():
    from setuptools import find_packages  # noqa: F401  (setuptools present, as for pip install)
    import distutils.core  # setuptools' shim

    root = Path(__file__).resolve().parents[2]
    dist = distutils.core.run_setup(str(root / "setup.py"), stop_after="init")
    patterns = dist.package_data["vllm_kvevict.lkv"]
    shipped = {p for pattern in patterns for p in (root / "vllm_kvevict/lkv").glob(pattern)}
    assert PACKAGED in shipped
