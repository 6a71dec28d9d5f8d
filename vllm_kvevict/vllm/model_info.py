"""What scoring reads of the served model, looked up once per layer: ``o_proj`` weights, RoPE,
and the model's identity (``lkv`` policies check their artifact against it)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from vllm_kvevict.lkv.identity import ModelIdentity

logger = logging.getLogger(__name__)


def layer_index(layer_name: str) -> int:
    """``model.layers.7.self_attn.attn`` -> 7 (the first integer component)."""
    for part in layer_name.split("."):
        if part.isdigit():
            return int(part)
    return 0


class ModelInfo:
    """A loaded vLLM model's attention-adjacent modules, by attention layer name."""

    def __init__(self, model: Optional[torch.nn.Module], num_layers: int) -> None:
        self.model = model
        self.num_layers = num_layers
        #: the HF config the model was built from (vLLM's ``model_config.hf_config``).
        self.hf_config: Any = getattr(model, "config", None)
        self._o_proj: dict[str, Optional[torch.Tensor]] = {}
        self._identity: Optional[ModelIdentity] = None

    @property
    def identity(self) -> ModelIdentity:
        """The served model's :class:`~vllm_kvevict.lkv.identity.ModelIdentity` (from its HF config)."""
        if self._identity is None:
            if self.hf_config is None:
                raise RuntimeError("the served model has no HF config: lkv policies cannot check their artifact")
            self._identity = ModelIdentity.from_hf_config(self.hf_config)
        return self._identity

    def rotary_of(self, layer_name: str) -> Any:
        """The layer's ``rotary_emb`` (``...self_attn.attn`` -> ``...self_attn.rotary_emb``)."""
        return self.model.get_submodule(layer_name[: -len("attn")] + "rotary_emb")

    def o_proj_of(self, layer_name: str) -> Optional[torch.Tensor]:
        """``[D, H*d]`` float32 ``o_proj`` weight of attention layer ``layer_name``; ``None`` if
        it cannot be found (logged once)."""
        if layer_name not in self._o_proj:
            weight = None
            if self.model is not None and layer_name.endswith(".attn"):
                try:
                    weight = linear_weight(self.model.get_submodule(layer_name[: -len("attn")] + "o_proj"))
                except Exception as exc:
                    logger.warning("kvevict: no o_proj weight for %s: %s", layer_name, exc)
            self._o_proj[layer_name] = weight
        return self._o_proj[layer_name]


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """``[out, in]`` float32 weight of a vLLM linear layer, even when the platform repacked it.

    vLLM's CPU path packs unquantized weights for oneDNN/sgl kernels and leaves an empty
    ``weight``; then the layer's own GEMM applied to the identity gives ``I @ W^T = W^T``.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel() > 0:
        return weight.detach().float()
    in_features = getattr(module, "input_size_per_partition", None) or module.input_size
    dtype = getattr(weight, "dtype", torch.float32)
    eye = torch.eye(in_features, dtype=dtype)
    with torch.no_grad():
        out = module.quant_method.apply(module, eye, None)
    return out.float().t().contiguous()
