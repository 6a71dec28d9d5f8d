"""The scheduler half of eviction: which requests may evict (:mod:`.state`), blocks leaving and
entering their block lists (:mod:`.blocks`), tied together by
:class:`~vllm_kvevict.vllm.scheduler.side.SchedulerSide`."""
