"""LKV: learned head-wise budgets (LKV-H) and a learned query-agnostic token scorer (LKV-T).

Both are small torch modules (:mod:`.nets`) stored in one safetensors artifact per model
(:mod:`.artifact`; one for SmolLM2-135M-Instruct ships in ``artifacts/``), trained by
self-distillation from the frozen model (``python -m vllm_kvevict.lkv.train``). The policies
``--kv-eviction lkv`` and ``--kv-allocation lkv`` read them (``vllm_kvevict.policies``). Design:
docs/LKV.md.
"""

from vllm_kvevict.lkv.artifact import (
    ARTIFACT_DIR,
    LKVArtifact,
    LKVArtifactError,
    LKVSource,
    artifact_for,
    load_artifact,
    save_artifact,
)
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.lkv.nets import HeadShares, NetShape, TokenScorer

__all__ = [
    "ARTIFACT_DIR",
    "HeadShares",
    "LKVArtifact",
    "LKVArtifactError",
    "LKVSource",
    "ModelIdentity",
    "NetShape",
    "TokenScorer",
    "artifact_for",
    "load_artifact",
    "save_artifact",
]
