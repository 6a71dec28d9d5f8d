"""Scorers: one module per method, each registering itself in
:data:`vllm_kvevict.policies.registry.SCORERS`.

A scorer returns ``[Hkv, L]`` float32, higher = keep; ``+inf`` marks positions the method
always keeps (its own window, sinks, or recent tokens). ``lkv`` registers here when it lands.
"""

from vllm_kvevict.policies.scorers import (  # noqa: F401
    criticalkv,
    defensivekv,
    expected_attention,
    h2o,
    keydiff,
    knorm,
    laprox,
    pyramidkv,
    snapkv,
    streamingllm,
    tova,
    value_aware,
)
