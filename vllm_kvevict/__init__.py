"""vllm-kvevict: KV-cache eviction for vLLM that returns the memory to vLLM's block pool."""

__version__ = "0.1.0"
