"""What the GPU attention impls do for rows being prefilled: observe, and score from the paged cache.

Per layer, after vLLM's kernel (the layer's K/V of this chunk are in the cache):

* a scorer the kernels cover (:func:`~vllm_kvevict.vllm.backends.paged_scoring.kernel_recipe`):
  its window queries are stashed as on CPU, and in the chunk that completes the prompt the
  kernels read the cache in place through the request's block table (on the device since the
  builder sent it, :class:`ScoringStep`): window log-sum-exp, the window statistics, value
  norms. Their ``[H, L]`` results are copied to pinned host memory without waiting; at the last
  layer the step waits once for the device and every layer's scores are assembled on the host
  (:meth:`ScoringStep.finish`). One device-to-host wait per scoring step, none in other steps.
* any other scorer runs the CPU path (:func:`~vllm_kvevict.vllm.backends.observe.observe_rows`)
  on host copies of the row's observed queries and of the gathered K/V (:class:`HostLayout`),
  with the ``o_proj`` weights copied to the host once (:class:`HostModel`); a log line says so,
  once per scorer.

A failure marks the request's sink (it then stays whole) and never reaches the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from vllm_kvevict.kernels import paged_value_norms, window_lse, window_scores
from vllm_kvevict.vllm.backends.gpu_tables import send, staging
from vllm_kvevict.vllm.backends.observe import observe_rows
from vllm_kvevict.vllm.backends.paged_scoring import KernelRecipe, LayerStats, kernel_recipe
from vllm_kvevict.vllm.layouts import PagedLayout, SplitHeadDimLayout
from vllm_kvevict.vllm.model_info import linear_weight
from vllm_kvevict.vllm.step import EvictionStep, RowObservation

logger = logging.getLogger(__name__)

_said_fallback: set[str] = set()


@dataclass
class PendingLayer:
    """One layer's kernel results of one scored row, in pinned host memory until the wait."""

    row: RowObservation
    layer_idx: int
    recipe: KernelRecipe
    window: dict[str, torch.Tensor]
    value_norms: Optional[torch.Tensor]


@dataclass
class ScoringStep:
    """The scoring state of one step, shared by its layers (built by the metadata builder).

    ``block_tables``: batch row -> ``[n]`` int32 positional blocks on the device, for every row
    whose prompt completes this step.
    """

    block_tables: dict[int, torch.Tensor]
    pending: list[PendingLayer] = field(default_factory=list)

    @classmethod
    def of(cls, step: EvictionStep, device: torch.device) -> Optional["ScoringStep"]:
        rows = {r: o for r, o in step.observe.items() if o.score}
        if not rows:
            return None
        tables = {}
        for r, obs in rows.items():
            host = staging((obs.block_ids.numel(),), torch.int32, device)
            host.copy_(obs.block_ids)
            tables[r] = send(host, device)
        return cls(tables)

    def finish(self, num_kv_heads: int, num_heads: int, num_layers: int) -> None:
        """Wait once for the device, then assemble every pending layer's scores on the host."""
        if not self.pending:
            return
        device = next(iter(self.block_tables.values())).device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        for p in self.pending:
            sink = p.row.sink
            if sink.error is not None:
                continue
            started = time.perf_counter()
            try:
                stats = LayerStats(p.row.prompt_len, num_kv_heads, num_heads, p.layer_idx, num_layers, p.window,
                                   p.value_norms)
                scores = p.recipe.assemble(stats, sink.policy.whole_pages)
                want = (num_kv_heads, p.row.prompt_len)
                if tuple(scores.values.shape) != want:
                    raise RuntimeError(f"scores {tuple(scores.values.shape)}, expected {want}")
                sink.scores[p.layer_idx] = scores
            except Exception as exc:  # never into the engine core
                logger.warning("kvevict: scoring failed for %s, request left whole: %s", p.row.req_id, exc)
                sink.fail(f"{type(exc).__name__}: {exc}")
            sink.seconds += time.perf_counter() - started
        self.pending.clear()


def observe_rows_gpu(step: EvictionStep, scoring: Optional[ScoringStep], layer_name: str, layer_idx: int,
                     query: torch.Tensor, kv_cache: torch.Tensor, layout: SplitHeadDimLayout, num_heads: int,
                     scale: float, unsupported: str = "") -> None:
    """Observe every row of ``step.observe`` for this layer (``query [tokens, H * d]`` or
    ``[tokens, H, d]``); at the last layer, assemble the step's scores."""
    for row_index, row in step.observe.items():
        recipe = None if unsupported else kernel_recipe(row.sink.policy.scorer)
        if recipe is None:
            if not unsupported:
                _say_fallback(row.sink.config.scorer)
            _host_observe(step, row_index, row, layer_name, layer_idx, query, kv_cache, layout, num_heads, scale,
                          unsupported)
            continue
        started = time.perf_counter()
        try:
            if row.sink.error is None:
                _kernel_observe(step, scoring, row_index, row, recipe, layer_name, layer_idx, query, kv_cache,
                                layout, num_heads, scale)
        except Exception as exc:  # never into the engine core
            logger.warning("kvevict: scoring failed for %s, request left whole: %s", row.req_id, exc)
            logger.debug("kvevict: scoring failure", exc_info=exc)
            row.sink.fail(f"{type(exc).__name__}: {exc}")
        row.sink.seconds += time.perf_counter() - started
    if scoring is not None and layer_idx == step.model.num_layers - 1:
        scoring.finish(layout.num_kv_heads, num_heads, step.model.num_layers)


def _kernel_observe(step, scoring, row_index: int, row: RowObservation, recipe: KernelRecipe, layer_name: str,
                    layer_idx: int, query, kv_cache, layout: SplitHeadDimLayout, num_heads: int, scale: float) -> None:
    sink, d = row.sink, layout.head_dim
    q = query.view(query.shape[0], num_heads, d)[row.query_offset : row.query_offset + row.num_queries]
    w0, w1 = row.window
    if w1 > w0:
        sink.window_queries.setdefault(layer_idx, []).append(q[w0:w1].detach().float().clone())
    if not row.score:
        return
    if scoring is None or row_index not in scoring.block_tables:
        raise RuntimeError("no block table on the device for a scoring row")
    length, table = row.prompt_len, scoring.block_tables[row_index]
    k_cache, v_cache = layout.key_value_views(kv_cache)
    stats: dict[str, torch.Tensor] = {}
    if recipe.window:
        window = sink.window_queries.get(layer_idx)
        if not window:
            raise RuntimeError("no window queries were observed")
        rows = min(recipe.window, length)
        queries = torch.cat(window)[-rows:].to(k_cache.dtype).contiguous()  # [W, H, d]
        positions = torch.arange(length - rows, length, device=k_cache.device)
        lse = window_lse(queries, k_cache, table, length, q_pos=positions, scale=scale)
        stats = window_scores(queries, lse, k_cache, table, length, q_pos=positions, scale=scale,
                              stats=recipe.stats, per_query_head=True)
    norms = None
    if recipe.norm:
        weight = _o_proj(step.model, layer_name, v_cache.dtype)
        norms = paged_value_norms(v_cache, table, length, weight, num_heads, p=recipe.norm).t()
    scoring.pending.append(PendingLayer(row, layer_idx, recipe, {k: _to_host(v) for k, v in stats.items()},
                                        None if norms is None else _to_host(norms)))


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A host copy of ``x`` in pinned memory, not waited for (read after :meth:`ScoringStep.finish`)."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
    host.copy_(x, non_blocking=True)
    return host


#: ModelInfo -> {(layer name, dtype): o_proj weight}.
_WEIGHTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _o_proj(model, layer_name: str, dtype: torch.dtype) -> torch.Tensor:
    """A layer's ``o_proj`` weight ``[D, H*d]`` in ``dtype`` on the model's device, kept per model:
    the module's own weight when it is a plain matrix of that dtype (no copy)."""
    cache = _WEIGHTS.setdefault(model, {})
    key = (layer_name, dtype)
    if key not in cache:
        module = model.model.get_submodule(layer_name[: -len("attn")] + "o_proj")
        weight = getattr(module, "weight", None)
        if not (isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel() and weight.dtype == dtype):
            weight = linear_weight(module).to(dtype)
        cache[key] = weight.detach()
    return cache[key]


def _say_fallback(scorer: str) -> None:
    if scorer not in _said_fallback:
        _said_fallback.add(scorer)
        logger.info("kvevict: %s scores through the torch reference on gathered K/V copied to the host "
                    "(no kernel path for it)", scorer)


class HostLayout(PagedLayout):
    """Another layout's reads, copied to the host (the torch scorers run there)."""

    def __init__(self, inner: PagedLayout) -> None:
        super().__init__(inner.num_kv_heads, inner.block_size, inner.head_dim)
        self.inner = inner

    def read(self, kv_cache, block, plane, slot):
        keys, values = self.inner.read(kv_cache, block, plane, slot)
        return keys.cpu(), values.cpu()

    def write(self, kv_cache, block, plane, slot, keys, values):
        raise NotImplementedError("HostLayout only reads")


class HostModel:
    """A :class:`~vllm_kvevict.vllm.model_info.ModelInfo` whose ``o_proj`` weights are float32
    host copies, made once per layer from the module's weight (no float32 copy stays on the
    device)."""

    def __init__(self, model: Any) -> None:
        self.model, self.num_layers = model, model.num_layers
        self._o_proj: dict[str, Optional[torch.Tensor]] = {}

    def rotary_of(self, layer_name: str) -> Any:
        return self.model.rotary_of(layer_name)

    def o_proj_of(self, layer_name: str) -> Optional[torch.Tensor]:
        if layer_name not in self._o_proj:
            weight = None
            try:
                module = self.model.model.get_submodule(layer_name[: -len("attn")] + "o_proj")
                weight = linear_weight(module).cpu()
            except Exception as exc:
                logger.warning("kvevict: no o_proj weight for %s: %s", layer_name, exc)
            self._o_proj[layer_name] = weight
        return self._o_proj[layer_name]


_HOST_MODELS: "weakref.WeakKeyDictionary[Any, HostModel]" = weakref.WeakKeyDictionary()


def _host_observe(step, row_index: int, row: RowObservation, layer_name: str, layer_idx: int, query, kv_cache,
                  layout, num_heads: int, scale: float, unsupported: str) -> None:
    """The CPU path for one row, on a host copy of the queries it observes (``window`` and
    ``collect`` rows only: the row is re-based on them)."""
    spans = [s for s in (row.window, row.collect) if s[1] > s[0]]
    lo, hi = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else (0, 0)

    def shifted(span: tuple[int, int]) -> tuple[int, int]:
        return (span[0] - lo, span[1] - lo) if span[1] > span[0] else (0, 0)

    local = dataclasses.replace(row, query_offset=0, num_queries=hi - lo, start=row.start + lo,
                                window=shifted(row.window), collect=shifted(row.collect))
    d = layout.head_dim
    start = row.query_offset + lo
    queries = query.view(query.shape[0], num_heads, d)[start : start + hi - lo].detach().cpu()
    host_model = _HOST_MODELS.get(step.model)
    if host_model is None:
        host_model = _HOST_MODELS[step.model] = HostModel(step.model)
    one_row = dataclasses.replace(step, observe={row_index: local}, model=host_model)
    observe_rows(one_row, layer_name, layer_idx, queries, kv_cache, HostLayout(layout), num_heads, scale, unsupported)
