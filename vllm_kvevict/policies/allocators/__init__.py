"""Allocators: how a layer's (or the model's) budget is split across KV heads.

Importing this package registers every allocator in
:data:`vllm_kvevict.policies.registry.ALLOCATORS`. Every allocator receives per-layer
:class:`~vllm_kvevict.policies.base.LayerScores` and returns ``[num_layers, Hkv]`` int64 head
budgets, each at least the head's protected and preferred count and at most ``L``; those that
compare tokens across heads follow :func:`~vllm_kvevict.policies.ranking.layer_order`.
"""

from vllm_kvevict.policies.allocators import adakv, adakv_floor, global_, lkv, pyramid, uniform  # noqa: F401
