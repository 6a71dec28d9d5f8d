"""The only part of vllm_kvevict that imports vllm."""
