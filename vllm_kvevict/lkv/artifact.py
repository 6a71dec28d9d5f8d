"""The LKV artifact: one safetensors file per model holding LKV-T and LKV-H.

Header (safetensors ``__metadata__``, all strings): ``format`` (:data:`FORMAT`), ``version``
(:data:`VERSION`), ``model`` (the :class:`~vllm_kvevict.lkv.identity.ModelIdentity` as JSON:
architecture, layer and head counts, head dim, config hash), ``net`` (the
:class:`~vllm_kvevict.lkv.nets.NetShape`), ``rope_scaling`` and ``training`` (what the training
run was: command, steps, kinds, held-out kinds, seed, wall time). Tensors: ``scorer.*`` and
``shares.*`` (the modules' state dicts, float32).

:func:`load_artifact` refuses a file of another format or version; :func:`artifact_for` refuses
an artifact made for another model (:class:`LKVArtifactError`, naming what differs) and finds
the packaged artifact of a model when no path is given (:data:`ARTIFACT_DIR`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from vllm_kvevict.artifact_files import ArtifactKind
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.lkv.nets import HeadShares, NetShape, TokenScorer

FORMAT = "vllm-kvevict-lkv"
VERSION = 1
#: Where the artifacts shipped with the package live (one per model).
ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
#: The config field an artifact path is set with (named in errors).
PATH_FIELD = "kv_lkv_artifact"

#: A model's identity, or a callable giving it when first needed (the vLLM worker learns its
#: model after the first request is admitted).
ModelSource = Union[ModelIdentity, Callable[[], ModelIdentity], None]


class LKVArtifactError(ValueError):
    """An LKV artifact is missing, malformed, or made for another model."""


KIND = ArtifactKind("LKV", FORMAT, VERSION, PATH_FIELD, LKVArtifactError, "python -m vllm_kvevict.lkv.train",
                    ARTIFACT_DIR)


@dataclass(frozen=True, eq=False)
class LKVArtifact:
    """A loaded artifact (modules in eval mode, no gradients).

    Attributes
    ----------
    identity : the model it was trained for.
    shape : the modules' sizes.
    scorer : LKV-T.
    shares : LKV-H.
    training : the training run's record (free-form JSON).
    path : the file it came from (``None`` if built in memory).
    """

    identity: ModelIdentity
    shape: NetShape
    scorer: TokenScorer
    shares: HeadShares
    training: dict = field(default_factory=dict)
    path: Optional[Path] = None

    @torch.no_grad()
    def token_scores(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[Hkv, L]`` float32 LKV-T scores of layer ``layer_idx`` (``keys, values [Hkv, L, d]``)."""
        if not 0 <= layer_idx < self.shape.num_layers:
            raise LKVArtifactError(f"layer {layer_idx} outside the artifact's {self.shape.num_layers} layers")
        if keys.shape[0] != self.shape.num_kv_heads or keys.shape[-1] != self.shape.head_dim:
            raise LKVArtifactError(
                f"keys {tuple(keys.shape)} do not fit the artifact ({self.shape.num_kv_heads} KV heads, "
                f"head dim {self.shape.head_dim})"
            )
        return self.scorer(layer_idx, keys.float(), values.float(), positions).float().contiguous()

    @torch.no_grad()
    def head_shares(self, budget_fraction: float) -> torch.Tensor:
        """``[Nl, Hkv]`` float32 LKV-H shares for a budget (fraction of the prompt kept)."""
        return self.shares(float(budget_fraction)).float()


def save_artifact(path: Union[str, Path], identity: ModelIdentity, scorer: TokenScorer, shares: HeadShares,
                  training: Optional[dict] = None) -> Path:
    """Write ``scorer`` and ``shares`` for ``identity`` to ``path`` (safetensors)."""
    tensors = {f"scorer.{k}": v.detach().float() for k, v in scorer.state_dict().items()}
    tensors |= {f"shares.{k}": v.detach().float() for k, v in shares.state_dict().items()}
    metadata = {
        "model": identity.to_json(),
        "net": json.dumps(scorer.shape.to_dict(), sort_keys=True),
        "rope_scaling": repr(scorer.rope_scaling),
        "training": json.dumps(training or {}, sort_keys=True),
    }
    return KIND.write(path, tensors, metadata)


def read_header(path: Union[str, Path]) -> dict[str, str]:
    """The artifact's metadata, checked for :data:`FORMAT` and :data:`VERSION`."""
    return KIND.read_header(path)


def load_artifact(path: Union[str, Path]) -> LKVArtifact:
    """Load and check an artifact file (cached per path and modification time)."""
    return _load(*KIND.file_key(path))


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> LKVArtifact:
    from safetensors.torch import load_file

    metadata = read_header(path)
    try:
        identity = ModelIdentity.from_json(metadata["model"])
        shape = NetShape(**json.loads(metadata["net"]))
        rope_scaling = float(metadata.get("rope_scaling", "1.0"))
        training = json.loads(metadata.get("training", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise LKVArtifactError(f"{PATH_FIELD}={path!r}: malformed header ({exc})") from None
    tensors = load_file(path)
    scorer = TokenScorer(shape, tensors.get("scorer.inv_freq", torch.zeros(shape.head_dim // 2)), rope_scaling)
    shares = HeadShares(shape)
    try:
        scorer.load_state_dict({k[len("scorer."):]: v for k, v in tensors.items() if k.startswith("scorer.")})
        shares.load_state_dict({k[len("shares."):]: v for k, v in tensors.items() if k.startswith("shares.")})
    except RuntimeError as exc:
        raise LKVArtifactError(f"{PATH_FIELD}={path!r}: tensors do not match its header ({exc})") from None
    scorer.eval().requires_grad_(False)
    shares.eval().requires_grad_(False)
    return LKVArtifact(identity, shape, scorer, shares, training, Path(path))


def packaged_artifacts() -> list[Path]:
    """The artifact files shipped in :data:`ARTIFACT_DIR`, sorted."""
    return KIND.packaged()


def artifact_for(model: ModelSource, path: Optional[Union[str, Path]] = None) -> LKVArtifact:
    """The artifact for ``model``: the file ``path``, else the packaged one made for it.

    Raises :class:`LKVArtifactError` when the model is unknown, when ``path`` was made for
    another model, or when no packaged artifact matches.
    """
    return KIND.resolve("lkv", model, path, load_artifact, packaged_artifact_path)


@lru_cache(maxsize=32)
def packaged_artifact_path(identity: ModelIdentity) -> Optional[Path]:
    """The packaged artifact made for ``identity`` (``None`` if there is none); looked up once."""
    return KIND.packaged_for(identity)


@dataclass(frozen=True)
class LKVSource:
    """Where a policy's artifact comes from, resolved when the policy first scores.

    Attributes
    ----------
    model : the model's identity (or a callable giving it).
    path : an explicit artifact file (``lkv_artifact``), else the packaged one for the model.
    """

    model: Any = field(default=None, compare=False)
    path: Optional[str] = None

    def artifact(self) -> LKVArtifact:
        return artifact_for(self.model, self.path)
