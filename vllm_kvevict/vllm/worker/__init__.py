"""The worker half of eviction: requests that may evict (:mod:`.requests`), each step's plan
(:mod:`.planner`), what happens after the forward (:mod:`.finish`), tied together by
:class:`~vllm_kvevict.vllm.worker.side.WorkerSide`."""
