"""The worker half of our KV connector: metadata in, one plan per step, evictions after the forward.

Per step, in the order vLLM's Model Runner V1 calls it (the only runner eviction runs on: Model
Runner V2 is switched off for eviction, :mod:`vllm_kvevict.vllm.startup`):

1. :meth:`WorkerSide.receive` (``handle_preemptions``, before the runner updates its batch):
   forget reset requests, admit this step's requests with their resolved policies, take the
   step's compaction orders;
2. :meth:`WorkerSide.plan` (runner hook, before the attention metadata is built): the step's
   :class:`~vllm_kvevict.vllm.step.EvictionStep`, which the attention metadata builders read
   through :meth:`current_step`;
3. :meth:`WorkerSide.finish` (``wait_for_save``, after the forward): evictions, reported back to
   the scheduler by :meth:`take_report`.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from vllm_kvevict.vllm.channel import KVEvictConnectorMetadata, KVEvictWorkerMetadata
from vllm_kvevict.vllm.model_info import ModelInfo, layer_index
from vllm_kvevict.vllm.step import EvictionStep
from vllm_kvevict.vllm.worker.finish import FinishedStep, finish_step
from vllm_kvevict.vllm.worker.planner import BatchRow, plan_step
from vllm_kvevict.vllm.worker.requests import RequestTable

logger = logging.getLogger(__name__)


@dataclass
class EvictionRecorder:
    """What tests and tools may look at after the fact (off unless set on :attr:`WorkerSide.recorder`)."""

    #: request id -> per-layer scores of its eviction.
    scores: dict[str, list] = field(default_factory=dict)
    #: request id -> evicted positional block indices (page granularity).
    evicted: dict[str, list[int]] = field(default_factory=dict)
    #: request id -> ``KeptSet`` (head granularity).
    kept: dict[str, Any] = field(default_factory=dict)
    #: request id -> why its eviction failed (it was left whole).
    failures: dict[str, str] = field(default_factory=dict)
    #: request id -> its decode-time evictions in order: ``seq_len``, ``held_blocks`` (positional
    #: indices held before), ``evicted`` (positional indices), ``scores`` (per layer).
    decode: dict[str, list[dict]] = field(default_factory=dict)
    #: request id -> seconds of its eviction pass by part: ``scoring`` (attention layers, every
    #: chunk), ``selection`` (after the forward), ``compaction`` (head granularity's copy).
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)


class WorkerSide:
    """Eviction state of one worker (see the module docstring)."""

    def __init__(self) -> None:
        self.table = RequestTable(self._make_policy)
        self.recorder: Optional[EvictionRecorder] = None
        self.block_size: Optional[int] = None
        self._orders: dict[str, list[int]] = {}
        self._step: Optional[EvictionStep] = None
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layouts: dict[str, Any] = {}
        self._layer_names: dict[int, str] = {}
        self._model: Optional[ModelInfo] = None
        self._runner_ref: Optional[Any] = None
        self._pending = KVEvictWorkerMetadata()

    # ----------------------------------------------------------------- set-up
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        self._layer_names = {layer_index(name): name for name in kv_caches}

    def bind_layout(self, layer_names: list[str], layout: Any) -> None:
        """Called by our attention metadata builders: how their layers' caches are laid out."""
        for name in layer_names:
            self._layouts[name] = layout
        self.block_size = layout.block_size

    def _make_policy(self, config):
        from vllm_kvevict.policies import build_policy

        def model_identity():
            # resolved when an lkv policy first scores: the first request is admitted before the
            # step that tells the worker its model (model_of)
            if self._model is None:
                raise RuntimeError("the served model is not known yet")
            return self._model.identity

        return build_policy(config, self.block_size, model=model_identity)

    def model_of(self, runner: Any, num_layers: int) -> ModelInfo:
        """The :class:`ModelInfo` of ``runner`` (rebuilt when another runner shows up: tests run
        several engines in one process)."""
        if self._runner_ref is None or self._runner_ref() is not runner:
            self._runner_ref = weakref.ref(runner)
            self._model = ModelInfo(runner.get_model(), num_layers)
        return self._model

    # ----------------------------------------------------------------- per step
    def receive(self, metadata: KVEvictConnectorMetadata) -> None:
        """The scheduler's metadata of the step about to run."""
        self.table.drop(metadata.reset_req_ids)
        for req_id, admission in metadata.admissions.items():
            self.table.admit(req_id, admission)
        self._orders = dict(metadata.compact_orders)
        self._step = None

    def has_requests(self) -> bool:
        """Whether any request may evict (otherwise steps need no plan)."""
        return len(self.table) > 0

    def plan(self, rows: Sequence[BatchRow], model: Optional[ModelInfo]) -> None:
        """Build this step's plan from the runner's batch (``rows`` in batch order)."""
        self._step = None
        if self.block_size is None or model is None or not rows:
            return
        try:
            self._step = plan_step(self.table, rows, self.block_size, model, self._orders)
        except Exception as exc:  # never into the engine core
            logger.warning("kvevict: step plan failed, no eviction this step: %s", exc)

    def current_step(self) -> Optional[EvictionStep]:
        return self._step

    def finish(self) -> FinishedStep:
        """After the forward: evict what was scored; every order of the step is settled."""
        step, self._step = self._step, None
        orders, self._orders = self._orders, {}
        done = finish_step(step, self.table, orders, self.block_size or 0, self._cache_of, self.recorder)
        self._pending.merge(done.report)
        return done

    def _cache_of(self, layer: int) -> tuple[torch.Tensor, Any]:
        name = self._layer_names.get(layer)
        if name is None or name not in self._layouts:
            raise RuntimeError(f"no KV cache or layout registered for layer {layer}")
        return self._kv_caches[name], self._layouts[name]

    def take_report(self) -> Optional[KVEvictWorkerMetadata]:
        """Reports not sent yet (``None`` if there are none)."""
        if self._pending.is_empty():
            return None
        report, self._pending = self._pending, KVEvictWorkerMetadata()
        return report
