"""The worker's per-request state across steps: one :class:`RequestTable` per worker.

A request enters when the scheduler admits it with a policy (its resolved config arrives in
the connector metadata), and leaves when the scheduler resets it (finished, preempted,
resumed) or the worker finds it inconsistent. In between it is *observing* (prompt being
prefilled), then *whole* (scored, nothing evicted, or failed), *page* (evicted blocks known) or
*head* (compacted into head-pages). A page-evicted request with decode-time eviction also
carries its :class:`~vllm_kvevict.vllm.step.DecodeWindow` and the length at its last eviction
(``decode_from``); with ``prompt_eviction="off"`` it goes from *observing* to *page* with nothing
evicted when its prompt completes, unscored (h2o: after that chunk's forward, its prompt's
attention sums collected).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from vllm_kvevict.vllm.channel import Admission
from vllm_kvevict.vllm.step import CompactRegion, DecodeWindow, Observations

OBSERVING, WHOLE, PAGE, HEAD = "observing", "whole", "page", "head"


@dataclass
class RequestState:
    admission: Admission
    policy: object  # vllm_kvevict.policies.Policy
    status: str = OBSERVING
    observations: Optional[Observations] = None
    #: page granularity: evicted positional block indices.
    evicted: Optional[torch.Tensor] = None
    #: head granularity: where the kept entries live.
    region: Optional[CompactRegion] = None
    #: end of the last chunk planned: a chunk starting before it means the request restarted.
    observed_until: int = 0
    #: decode-time eviction (``config.decode_interval > 0``): the window and scores across steps.
    decode: Optional[DecodeWindow] = None
    #: decode-time eviction: the request's length at its last eviction (the prompt's at first).
    decode_from: int = 0

    @property
    def config(self):
        return self.admission.config

    @property
    def prompt_len(self) -> int:
        return self.admission.prompt_len

    def settle(self, status: str) -> None:
        """Leave the observing state (its observations are dropped)."""
        self.status, self.observations = status, None

    def settle_pages(self, evicted: Iterable[int] = ()) -> None:
        """Settle *page* with ``evicted`` positional blocks dropped (none: positional, every
        position held, as a prompt kept whole that evicts during decode)."""
        self.evicted = torch.tensor(list(evicted), dtype=torch.long)
        self.settle(PAGE)


class RequestTable:
    """Requests that may evict, by request id."""

    def __init__(self, make_policy) -> None:
        #: ``make_policy(config) -> Policy`` (bound to the KV cache's block size).
        self._make_policy = make_policy
        self._requests: dict[str, RequestState] = {}

    def admit(self, req_id: str, admission: Admission) -> RequestState:
        policy = self._make_policy(admission.config)
        config = admission.config
        state = RequestState(admission, policy, decode_from=admission.prompt_len)
        if config.evicts_prompt or (config.evicts_during_decode and policy.needs.attention_sums):
            # prompt_eviction "off" with h2o: observed for its attention sums only, never scored
            state.observations = Observations(policy, config, admission.prompt_len, fault=admission.fault)
        if config.evicts_during_decode:
            state.decode = DecodeWindow(config.window, fault=admission.fault)
        self._requests[req_id] = state
        return state

    def drop(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._requests.pop(req_id, None)

    def get(self, req_id: str) -> Optional[RequestState]:
        return self._requests.get(req_id)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)
