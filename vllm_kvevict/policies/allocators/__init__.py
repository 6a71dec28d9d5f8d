"""Allocators: how a layer's (or the model's) budget is split across KV heads.

Importing this package registers every allocator in
:data:`vllm_kvevict.policies.registry.ALLOCATORS`. Every allocator receives *protected* scores
(window and sinks at ``+inf``, see :func:`vllm_kvevict.policies.select.protect`) and returns
``[num_layers, Hkv]`` int64 head budgets, each at least the head's ``+inf`` count and at most ``L``.
"""

from vllm_kvevict.policies.allocators import adakv, adakv_floor, global_, pyramid, uniform  # noqa: F401
