"""Scorers: one module per method, each a small class and a factory from the config registered
in :data:`vllm_kvevict.policies.registry.SCORERS`.

A scorer returns :class:`~vllm_kvevict.policies.base.LayerScores`: values ``[Hkv, L]`` float32,
higher = keep, with the positions the method always keeps (its own window, sinks, or recent
tokens) in ``protected``.
"""

from vllm_kvevict.policies.scorers.criticalkv import CriticalKV
from vllm_kvevict.policies.scorers.defensivekv import DefensiveKV
from vllm_kvevict.policies.scorers.expected_attention import ExpectedAttention
from vllm_kvevict.policies.scorers.h2o import H2O
from vllm_kvevict.policies.scorers.keydiff import KeyDiff
from vllm_kvevict.policies.scorers.knorm import KNorm
from vllm_kvevict.policies.scorers.laprox import LaProx
from vllm_kvevict.policies.scorers.lkv import LKVTokens
from vllm_kvevict.policies.scorers.pyramidkv import pyramidkv  # noqa: F401  (registers "pyramidkv")
from vllm_kvevict.policies.scorers.snapkv import SnapKV
from vllm_kvevict.policies.scorers.streamingllm import StreamingLLM
from vllm_kvevict.policies.scorers.tova import TOVA
from vllm_kvevict.policies.scorers.value_aware import ValueAware

__all__ = [
    "CriticalKV",
    "DefensiveKV",
    "ExpectedAttention",
    "H2O",
    "KNorm",
    "KeyDiff",
    "LKVTokens",
    "LaProx",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "ValueAware",
]
