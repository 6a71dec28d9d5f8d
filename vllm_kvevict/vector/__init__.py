"""VECTOR: values rebuilt from keys by a calibrated regression, for the key-only route.

:mod:`.regression` fits ``v ~ [k', 1] @ W`` per (layer, KV head) from streamed moments;
:mod:`.calibrate` is the command that makes the artifact (``python -m
vllm_kvevict.vector.calibrate --model DIR --out FILE``); :mod:`.artifact` reads it and rebuilds
values. The policy wrapper and the routes are in :mod:`vllm_kvevict.policies.vector`; design:
docs/VECTOR.md. No vLLM import.
"""

from vllm_kvevict.vector.artifact import (
    ARTIFACT_DIR,
    VectorArtifact,
    VectorArtifactError,
    VectorSource,
    artifact_for,
    load_artifact,
    save_artifact,
)

__all__ = [
    "ARTIFACT_DIR",
    "VectorArtifact",
    "VectorArtifactError",
    "VectorSource",
    "artifact_for",
    "load_artifact",
    "save_artifact",
]
