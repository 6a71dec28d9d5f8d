"""Attention backends with eviction: each wraps one of vLLM's (its builder attaches the step's
:class:`~vllm_kvevict.vllm.step.EvictionStep` to the stock metadata, its impl runs the stock
forward and then reads the step), sharing :mod:`.observe` and :mod:`.head_rows`."""
