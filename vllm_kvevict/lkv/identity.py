"""Which model an LKV artifact belongs to: :class:`ModelIdentity`, built from an HF config.

The plugin (vLLM's ``hf_config``) and the reference engine (``model.config``) build it from the
same ``config.json``, so an artifact trained on one model is found, and refused for any other,
the same way in both. The hash covers the fields that fix the architecture (shapes, RoPE,
normalisation, vocabulary); it does not cover the weights: a fine-tune with the same config
passes the check (docs/LKV.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

#: HF config fields hashed into :attr:`ModelIdentity.config_hash` (those present are used).
HASHED_FIELDS: tuple[str, ...] = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class ModelIdentity:
    """A model's architecture, as an LKV artifact records it.

    Attributes
    ----------
    architecture : the config's first ``architectures`` entry (e.g. ``LlamaForCausalLM``).
    num_layers, num_heads, num_kv_heads, head_dim : attention geometry.
    config_hash : sha256 (first 16 hex digits) of the :data:`HASHED_FIELDS` of the config.
    """

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    config_hash: str

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelIdentity":
        """From a ``transformers`` config object or its ``to_dict()``."""
        fields = config if isinstance(config, Mapping) else config.to_dict()
        missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size") if k not in fields]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}: not a decoder config")
        num_heads = int(fields["num_attention_heads"])
        head_dim = fields.get("head_dim") or int(fields["hidden_size"]) // num_heads
        architectures = fields.get("architectures") or [fields.get("model_type", "unknown")]
        return cls(
            architecture=str(architectures[0]),
            num_layers=int(fields["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(fields.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            config_hash=config_hash(fields),
        )

    @classmethod
    def from_json(cls, text: str) -> "ModelIdentity":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        return (
            f"{self.architecture} ({self.num_layers} layers, {self.num_heads} heads, {self.num_kv_heads} KV heads, "
            f"head dim {self.head_dim}, config {self.config_hash})"
        )

    def differences(self, other: "ModelIdentity") -> list[str]:
        """``field: mine != theirs`` for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def config_hash(fields: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of the :data:`HASHED_FIELDS` present."""
    chosen = {k: fields[k] for k in HASHED_FIELDS if fields.get(k) is not None}
    text = json.dumps(chosen, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
