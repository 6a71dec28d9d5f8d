"""The VECTOR artifact: per (layer, KV head) a regression of values on keys, one file per model.

Header (safetensors ``__metadata__``): ``format`` (:data:`FORMAT`), ``version``, ``model`` (the
:class:`~vllm_kvevict.lkv.identity.ModelIdentity`), ``rope_scaling`` and ``calibration`` (the
command, data, tokens, time). Tensors:

* ``weight [Nl, Hkv, d + 1, d]`` float32: ``v ~ [k', 1] @ weight[l, g]``;
* ``derotate [Nl, Hkv]`` bool: ``k'`` is the key with RoPE undone at its position (else the
  cached, rotated key), chosen per head by held-out R^2;
* ``r2 [Nl, Hkv, 2]`` float32: held-out R^2 with the cached key (0) and the de-rotated key (1);
* ``inv_freq [d / 2]`` float32: the model's RoPE frequencies (to undo it).

Found by default for the model served (the packaged file in ``artifacts/``), refused for
another model (:class:`VectorArtifactError`, naming what differs); ``kv_vector_artifact``
names another file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import torch

from vllm_kvevict.artifact_files import ArtifactKind
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.lkv.nets import unrotate_keys

FORMAT = "vllm-kvevict-vector"
VERSION = 1
ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
PATH_FIELD = "kv_vector_artifact"


class VectorArtifactError(ValueError):
    """A VECTOR artifact is missing, malformed, or made for another model."""


KIND = ArtifactKind("VECTOR", FORMAT, VERSION, PATH_FIELD, VectorArtifactError,
                    "python -m vllm_kvevict.vector.calibrate", ARTIFACT_DIR)


def regressor_keys(keys: torch.Tensor, positions: torch.Tensor, derotate: torch.Tensor, inv_freq: torch.Tensor,
                   rope_scaling: float) -> torch.Tensor:
    """``[..., Hkv, n, d]`` float32: each head's regression input from cached ``keys``, the key
    de-rotated at ``positions`` (broadcasting with ``keys.shape[:-1]``) where ``derotate [Hkv]``,
    else the cached key."""
    keys = keys.float()
    if not bool(derotate.any()):
        return keys
    plain = unrotate_keys(keys, positions, inv_freq, rope_scaling)
    return torch.where(derotate.view(-1, 1, 1), plain, keys)


def rebuilt_values(keys: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor, derotate: torch.Tensor,
                   inv_freq: torch.Tensor, rope_scaling: float) -> torch.Tensor:
    """``[..., Hkv, n, d]`` float32 values ``[k', 1] @ weight[g]`` (``weight [Hkv, d + 1, d]``, one
    layer's) rebuilt from cached ``keys`` (:func:`regressor_keys`)."""
    x = regressor_keys(keys, positions, derotate, inv_freq, rope_scaling)
    return x @ weight[:, :-1] + weight[:, -1:]


@dataclass(frozen=True, eq=False)
class VectorArtifact:
    """A loaded artifact (see the module docstring for the tensors)."""

    identity: ModelIdentity
    weight: torch.Tensor
    derotate: torch.Tensor
    r2: torch.Tensor
    inv_freq: torch.Tensor
    rope_scaling: float = 1.0
    calibration: dict = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def num_layers(self) -> int:
        return int(self.weight.shape[0])

    def regressors(self, layer: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[Hkv, n, d]`` float32: each head's regression input, the key de-rotated at
        ``positions [n]`` where the calibration chose that, else the cached key."""
        return regressor_keys(keys, positions, self.derotate[layer], self.inv_freq, self.rope_scaling)

    def reconstruct(self, layer: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[Hkv, n, d]`` float32 values rebuilt from cached ``keys [Hkv, n, d]`` at ``positions [n]``."""
        if not 0 <= layer < self.num_layers or keys.shape[0] != self.weight.shape[1] \
                or keys.shape[-1] != self.weight.shape[-1]:
            raise VectorArtifactError(
                f"layer {layer}, keys {tuple(keys.shape)} do not fit the artifact ({tuple(self.weight.shape)})"
            )
        return rebuilt_values(keys, positions, self.weight[layer], self.derotate[layer], self.inv_freq,
                              self.rope_scaling)

    def residuals(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[Hkv, n]`` float32 ``||v - v_hat||^2`` of every token."""
        diff = values.float() - self.reconstruct(layer, keys, positions)
        return (diff * diff).sum(dim=-1)


def save_artifact(path: Union[str, Path], identity: ModelIdentity, weight: torch.Tensor, derotate: torch.Tensor,
                  r2: torch.Tensor, inv_freq: torch.Tensor, rope_scaling: float = 1.0,
                  calibration: Optional[dict] = None) -> Path:
    """Write one artifact (shapes in the module docstring)."""
    tensors = {"weight": weight.float(), "derotate": derotate.bool(), "r2": r2.float(), "inv_freq": inv_freq.float()}
    metadata = {"model": identity.to_json(), "rope_scaling": repr(float(rope_scaling)),
                "calibration": json.dumps(calibration or {}, sort_keys=True)}
    return KIND.write(path, tensors, metadata)


def load_artifact(path: Union[str, Path]) -> VectorArtifact:
    """Load and check an artifact file (cached per path and modification time)."""
    return _load(*KIND.file_key(path))


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> VectorArtifact:
    from safetensors.torch import load_file

    metadata = KIND.read_header(path)
    try:
        identity = ModelIdentity.from_json(metadata["model"])
        rope_scaling = float(metadata.get("rope_scaling", "1.0"))
        calibration = json.loads(metadata.get("calibration", "{}"))
        t = load_file(path)
        artifact = VectorArtifact(identity, t["weight"], t["derotate"].bool(), t["r2"], t["inv_freq"], rope_scaling,
                                  calibration, Path(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise VectorArtifactError(f"{PATH_FIELD}={path!r}: malformed artifact ({exc})") from None
    shape = (identity.num_layers, identity.num_kv_heads, identity.head_dim + 1, identity.head_dim)
    if tuple(artifact.weight.shape) != shape or tuple(artifact.derotate.shape) != shape[:2]:
        raise VectorArtifactError(f"{PATH_FIELD}={path!r}: weight {tuple(artifact.weight.shape)}, expected {shape}")
    return artifact


@lru_cache(maxsize=32)
def packaged_artifact_path(identity: ModelIdentity) -> Optional[Path]:
    return KIND.packaged_for(identity)


def artifact_for(model: Any, path: Optional[Union[str, Path]] = None) -> VectorArtifact:
    """The artifact for ``model`` (an identity or a callable giving it): the file ``path``,
    else the packaged one made for it; refused for another model."""
    return KIND.resolve("vector", model, path, load_artifact, packaged_artifact_path)


@dataclass(frozen=True)
class VectorSource:
    """Where a policy's artifact comes from, resolved when first used."""

    model: Any = field(default=None, compare=False)
    path: Optional[str] = None

    def artifact(self) -> VectorArtifact:
        return artifact_for(self.model, self.path)
