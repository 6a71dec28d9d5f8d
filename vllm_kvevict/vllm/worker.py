"""Worker-side eviction state: which requests score this step, which rows attend compacted.

One :class:`WorkerEvictionState` lives in each worker process (:func:`get_worker_state`). Per
step it goes through:

1. :meth:`begin_step` (KV connector, before the runner updates its batch): forget requests that
   finished, were preempted or resumed (their blocks changed under them).
2. :meth:`plan_step` (hook on the runner's attention-metadata build): map batch rows to requests;
   rows whose chunk holds window positions stash those queries; rows whose chunk completes the
   prompt are scored this step; rows of requests that already evicted attend compacted.
3. The attention backend calls :meth:`record_window` / :meth:`record_scores` per layer.
4. :meth:`finish_step` (KV connector, after the forward): turns every scored request's layer
   scores into kept pages and returns ``{req_id: evicted positional block indices}``; from the
   next step on, those rows attend compacted and the scheduler frees the blocks.

Nothing here raises into the engine: a failing request is logged and left uncompressed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from vllm_kvevict.config import EvictionConfig

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- policy access
def resolve_request_config(
    extra_args: Optional[Mapping[str, Any]], server_default: EvictionConfig
) -> Optional[EvictionConfig]:
    """The request's policy, or ``None`` when it must be left untouched.

    ``None`` for ``scorer == "none"``, a budget that keeps everything, or an invalid override
    (logged; the API server should have rejected it already).
    """
    try:
        cfg = EvictionConfig.from_flat(dict(extra_args or {}), base=server_default)
    except Exception as exc:  # never into the engine core
        logger.warning("kvevict: bad per-request eviction settings, request left whole: %s", exc)
        return None
    if cfg.keeps_everything:
        return None
    return cfg


def needs_query_stats(config: EvictionConfig) -> bool:
    """Whether the scorer reads pre-RoPE query statistics of the whole prompt."""
    return config.scorer == "expected_attention"


def needs_attention_sum(config: EvictionConfig) -> bool:
    """Whether the scorer reads the attention every prompt query paid (``h2o``)."""
    return config.scorer == "h2o"


def _score_layer(inputs, config: EvictionConfig, block_size: int) -> torch.Tensor:
    """``[Hkv, L]`` token scores of one layer.

    Head granularity selecting tokens: the scorer's own scores (``score_layer``), as the
    reference engine. Whole pages (page granularity, or per head with ``head_selection="page"``):
    scores to pool into page scores (``page_score_layer``: a scorer's page variant where it has
    one, since criticalkv's keep-marks would swamp page sums).
    """
    from vllm_kvevict.policies import head_score_layer, page_score_layer

    if config.resolved_granularity == "head":
        return head_score_layer(inputs, config, block_size)
    return page_score_layer(inputs, config)


def choose_evicted_blocks(
    scores_per_layer: list[torch.Tensor], prompt_len: int, block_size: int, config: EvictionConfig
) -> list[int]:
    """Positional indices of the prompt blocks to evict (sorted).

    Only full blocks before the block holding the prompt's last token are candidates: the last
    prompt block is always kept (decode appends to it). ``select_pages`` of the policies package
    chooses the kept blocks when present; otherwise blocks are ranked by their mean score (sinks'
    and window's blocks forced in) and ``ceil(budget_tokens / block_size)`` are kept.

    Parameters
    ----------
    scores_per_layer : list over layers of ``[Hkv, prompt_len]`` float32.
    """
    from vllm_kvevict.policies import page_scores, protect, select_pages

    num_blocks = math.ceil(prompt_len / block_size)
    last_block = (prompt_len - 1) // block_size
    # Same pipeline as the reference engine's page mode (reference/selection.kept_blocks).
    block_scores = page_scores([protect(s, config) for s in scores_per_layer], block_size)
    keep = {int(b) for b in select_pages(block_scores, prompt_len, block_size, config)}
    keep.add(last_block)
    return [b for b in range(num_blocks) if b not in keep and b < last_block]


# --------------------------------------------------------------------------- state
@dataclass
class RequestState:
    """What the worker knows about one request that may evict."""

    config: EvictionConfig
    prompt_len: int
    #: layer name -> list of ``[w, H, d]`` window query chunks, in position order.
    window_queries: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    #: layer index -> ``[Hkv, prompt_len]`` scores of the last prefill chunk.
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    #: positional indices of evicted blocks (sorted) once eviction happened.
    evicted: Optional[torch.Tensor] = None
    failed: bool = False
    #: end position of the last chunk seen; a smaller start later means the request restarted.
    observed_until: int = 0
    #: time spent on this request's eviction (window stash, scoring, page choice).
    seconds: float = 0.0
    #: layer name -> pre-RoPE query statistics (``expected_attention`` only).
    query_stats: dict = field(default_factory=dict)
    #: layer name -> ``[H, prompt_len]`` attention paid by every prompt query so far (``h2o``).
    attention_sum: dict = field(default_factory=dict)
    #: head granularity: the request's positional block ids covering the prompt, taken in its
    #: scoring step (the compaction's sources).
    source_blocks: Optional[torch.Tensor] = None
    #: head granularity: where its kept entries live once compacted (``None`` otherwise).
    head: Optional["HeadEviction"] = None


@dataclass
class HeadEviction:
    """A compacted head-granular request: what it keeps and where (``head_pages.CompactRegion``)."""

    kept: Any  # policies.KeptSet
    region: Any


@dataclass
class HeadRow:
    """A batch row attending its compact region and positional tail this step."""

    req_id: str
    head: HeadEviction


@dataclass
class RowPlan:
    """One batch row's part in this step. ``window_lo/hi``: its query rows (relative to the
    row's first query) that are window positions; ``score``: this chunk completes the prompt;
    ``collect_lo/hi``: rows whose pre-RoPE statistics (``expected_attention``) or attention
    (``h2o``) are gathered."""

    req_id: str
    window_lo: int = 0
    window_hi: int = 0
    score: bool = False
    #: position of the row's first query; query rows whose pre-RoPE statistics are gathered.
    start: int = 0
    collect_lo: int = 0
    collect_hi: int = 0


class WorkerEvictionState:
    """Per-process eviction state of one worker (see the module docstring)."""

    def __init__(self) -> None:
        self.server_default: EvictionConfig = EvictionConfig()
        self.requests: dict[str, RequestState] = {}
        #: batch row -> plan, for the step being run (empty outside a step).
        self.rows: dict[int, RowPlan] = {}
        #: batch row -> evicted positional block indices, for rows attending compacted.
        self.compact_rows: dict[int, torch.Tensor] = {}
        self.step_open = False
        self._planned: set[str] = set()
        #: True when the runner hook (MRV2) already compacted this step's block tables.
        self.compacted_by_runner = False
        #: set by our KV connector on the worker: without it nothing is planned.
        self.enabled = False
        #: request id -> ``SamplingParams.extra_args`` (MRV2 keeps no sampling params per request).
        self.extra_args: dict[str, Any] = {}
        self.block_size: Optional[int] = None
        self.num_layers = 1
        #: attention layer name -> ``[D, H*d]`` o_proj weight (filled lazily).
        self.o_proj: dict[str, torch.Tensor] = {}
        self.model: Optional[torch.nn.Module] = None
        #: weak reference to the model runner the cached model/o_proj/layers belong to.
        self.runner_ref: Optional[Any] = None
        #: request id -> (policy, seconds spent scoring + choosing) of this step's evictions.
        self.last_evictions: dict[str, tuple[str, float]] = {}
        #: request id -> evicted block indices of the latest evictions (bounded; for tests/logs).
        self.history: dict[str, list[int]] = {}
        #: request id -> the scheduler's admission count of the request (echoed in reports).
        self.generations: dict[str, int] = {}
        #: when a dict (tests set it), request id -> per-layer ``[Hkv, L]`` scores of its eviction.
        self.debug_scores: Optional[dict[str, list[torch.Tensor]]] = None
        #: requests left whole because scoring or selection failed (each one logged).
        self.num_failed = 0
        #: batch row -> head-granular row attending its compact region this step.
        self.head_rows: dict[int, HeadRow] = {}
        #: request id -> the ``K`` compact block ids the scheduler took for its scoring step.
        self.compact_orders: dict[str, list[int]] = {}
        #: layer index -> (its KV cache tensor, the CPU kernels' ISA), seen by the backend.
        self.kv_caches: dict[int, tuple[torch.Tensor, str]] = {}
        #: this step's head-granular reports: request id -> kept tokens per (layer, KV head) of
        #: the requests compacted; requests whose order was not used (their blocks go back).
        self.head_compacted: dict[str, list[int]] = {}
        self.head_failed: set[str] = set()
        #: when a dict (tests set it), request id -> the ``KeptSet`` of its head-granular eviction.
        self.debug_kept: Optional[dict[str, Any]] = None

    # ----------------------------------------------------------------- step lifecycle
    def open_step(self) -> None:
        """Start planning a step (no-op if already open: MRV2 plans before the connector runs)."""
        if self.step_open:
            return
        self.rows = {}
        self.compact_rows = {}
        self.head_rows = {}
        self._planned = set()
        self.compacted_by_runner = False
        self.step_open = True

    def apply_resets(self, reset_req_ids, generations: Optional[Mapping[str, int]] = None) -> None:
        """Forget requests whose blocks changed under them (finished, preempted, resumed).

        Requests already planned in the open step are kept (MRV2 plans before the connector
        delivers the resets; a request that restarted is caught by :meth:`plan_row`).
        """
        planned = {plan.req_id for plan in self.rows.values()}
        for req_id in reset_req_ids:
            if req_id in planned:
                continue
            self.requests.pop(req_id, None)
            self.generations.pop(req_id, None)
            self.extra_args.pop(req_id, None)
            self.compact_orders.pop(req_id, None)
        self.generations.update(generations or {})

    def begin_step(
        self,
        reset_req_ids,
        generations: Optional[Mapping[str, int]] = None,
        compact_orders: Optional[Mapping[str, list[int]]] = None,
    ) -> None:
        """V1 order (connector first, then planning): resets, compaction orders, open the step."""
        self.apply_resets(reset_req_ids, generations)
        self.compact_orders.update(compact_orders or {})
        self.open_step()

    def track(self, req_id: str, extra_args, prompt_len: int) -> Optional[RequestState]:
        state = self.requests.get(req_id)
        if state is None:
            cfg = resolve_request_config(extra_args, self.server_default)
            if cfg is None:
                return None
            state = RequestState(config=cfg, prompt_len=prompt_len)
            self.requests[req_id] = state
        return state

    def plan_row(self, row: int, req_id: str, extra_args, prompt_len: int, num_computed: int, q_len: int) -> None:
        """Decide what row ``row`` does this step (called for every row of the batch)."""
        if req_id in self._planned:
            return  # metadata built twice in one step (e.g. drafters): plan once
        self._planned.add(req_id)
        state = self.requests.get(req_id)
        if state is not None and num_computed < state.observed_until:
            # The request restarted (preempted and re-admitted): its blocks are new.
            self.requests.pop(req_id, None)
            state = None
        if state is not None and state.head is not None:
            self.head_rows[row] = HeadRow(req_id, state.head)
            # the stock kernel reads only the tail (the backend replaces its output)
            self.compact_rows[row] = torch.arange(state.head.region.first_tail_block)
            return
        if state is not None and state.evicted is not None:
            if state.evicted.numel():
                self.compact_rows[row] = state.evicted
            return
        if num_computed >= prompt_len:
            return  # decoding and never evicted (e.g. policy off, or too short)
        state = state or self.track(req_id, extra_args, prompt_len)
        if state is None or state.failed:
            return
        start, end = num_computed, num_computed + q_len
        w0 = max(0, prompt_len - state.config.window)
        lo, hi = max(start, w0), min(end, prompt_len)
        state.observed_until = end
        plan = RowPlan(req_id=req_id, start=start)
        if hi > lo:
            plan.window_lo, plan.window_hi = lo - start, hi - start
        if needs_query_stats(state.config) or needs_attention_sum(state.config):
            first = state.config.resolved_sinks if needs_query_stats(state.config) else 0
            c_lo, c_hi = max(start, first), min(end, prompt_len)
            if c_hi > c_lo:
                plan.collect_lo, plan.collect_hi = c_lo - start, c_hi - start
        if end >= prompt_len:
            plan.score = True
        if plan.score or hi > lo or plan.collect_hi > plan.collect_lo:
            self.rows[row] = plan

    def finish_step(self) -> dict[str, list[int]]:
        """Choose evicted pages for every request scored this step; ``{req_id: blocks}``."""
        out: dict[str, list[int]] = {}
        self.last_evictions = {}
        self.head_compacted, self.head_failed = {}, set()
        if not self.step_open:
            return out
        self.step_open = False
        for plan in self.rows.values():
            if not plan.score:
                continue
            state = self.requests.get(plan.req_id)
            if state is None or state.failed or state.evicted is not None:
                if self.compact_orders.pop(plan.req_id, None) is not None:
                    self.head_failed.add(plan.req_id)  # its compact blocks go back
                continue
            started = time.perf_counter()
            try:
                layers = [state.scores[i] for i in sorted(state.scores)]
                if len(layers) != self.num_layers or self.block_size is None:
                    raise RuntimeError(f"scores for {len(layers)}/{self.num_layers} layers")
                if self.debug_scores is not None:
                    self.debug_scores[plan.req_id] = [t.clone() for t in layers]
                if state.config.resolved_granularity == "head":
                    self._select_head(plan.req_id, state, layers)
                    evicted = []
                else:
                    evicted = choose_evicted_blocks(layers, state.prompt_len, self.block_size, state.config)
            except Exception as exc:
                logger.warning("kvevict: eviction skipped for %s: %s", plan.req_id, exc)
                state.failed = True
                self.num_failed += 1
                evicted = []
            state.seconds += time.perf_counter() - started
            state.scores.clear()
            state.window_queries.clear()
            state.query_stats.clear()
            state.attention_sum.clear()
            if state.head is not None:
                self.last_evictions[plan.req_id] = (state.config.scorer, state.seconds)
                continue
            state.evicted = torch.tensor(evicted, dtype=torch.long)
            out[plan.req_id] = evicted
            self.history[plan.req_id] = evicted
            while len(self.history) > 256:
                self.history.pop(next(iter(self.history)))
            self.last_evictions[plan.req_id] = (state.config.scorer, state.seconds)
        self.rows = {}
        self.compact_rows = {}  # a step's plan never outlives it (a stock engine may follow)
        self.head_rows = {}
        self.kv_caches = {}
        return out

    def _select_head(self, req_id: str, state: RequestState, layers: list[torch.Tensor]) -> None:
        """Head granularity, after the scoring step's forward: each (layer, KV head)'s kept
        tokens, copied into the head-pages of the ``K`` blocks the scheduler took for this step.
        Without an order (compaction would not release more blocks than it takes, or the pool
        had no room) the request stays whole; a failure with an order gives its blocks back."""
        from vllm_kvevict.cache import plan_compaction
        from vllm_kvevict.policies import plan_head
        from vllm_kvevict.vllm.head_pages import CompactRegion

        block_ids = self.compact_orders.pop(req_id, None)
        if block_ids is None:
            return
        try:
            kept = plan_head(layers, state.config, state.prompt_len, self.block_size)
            plan = plan_compaction(kept, block_ids, self.block_size, kept.head_budgets.shape[1])
            self._compact(state, plan)
        except Exception:
            self.head_failed.add(req_id)
            raise
        if self.debug_kept is not None:
            self.debug_kept[req_id] = kept
        state.head = HeadEviction(kept=kept, region=CompactRegion.from_plan(plan, state.prompt_len))
        state.source_blocks = None
        self.head_compacted[req_id] = kept.head_budgets.flatten().tolist()

    def _compact(self, state: RequestState, plan: Any) -> None:
        """Copy every layer's kept K/V from the request's positional blocks into its head-pages.

        Runs after the scoring step's forward: nothing can have been written to those positional
        blocks since (the scheduler frees them only once this step's output is processed)."""
        from vllm_kvevict.vllm.backend import packed_pages
        from vllm_kvevict.vllm.head_pages import compact_layer

        if state.source_blocks is None or len(self.kv_caches) < plan.num_layers:
            raise RuntimeError("compaction sources or KV caches not seen in the scoring step")
        for layer in range(plan.num_layers):
            kv_cache, isa = self.kv_caches[layer]
            _, _, block_size, two_d = kv_cache.shape
            pages = packed_pages(isa, block_size, two_d // 2, kv_cache.dtype)
            compact_layer(kv_cache, pages, state.source_blocks, plan.layer_gather(layer))

    def fail_head_row(self, row: int, exc: BaseException) -> None:
        """Attention over a compacted row failed (logged; its output this step is the stock
        kernel's over the tail only)."""
        head_row = self.head_rows.get(row)
        if head_row is not None:
            logger.error("kvevict: head-granular attention failed for %s: %s", head_row.req_id, exc)
            logger.debug("kvevict: head-granular failure", exc_info=exc)

    def generation_of(self, req_id: str) -> int:
        return self.generations.get(req_id, 0)

    # ----------------------------------------------------------------- called by the backend
    def record_window(self, layer_name: str, row: int, queries: torch.Tensor) -> None:
        """Stash ``queries [w, H, d]`` (this chunk's window positions) of row ``row``."""
        state = self.requests[self.rows[row].req_id]
        state.window_queries.setdefault(layer_name, []).append(queries.detach().float().clone())

    def window_of(self, layer_name: str, row: int) -> torch.Tensor:
        """``[H, W, d]`` window queries of row ``row`` for ``layer_name``."""
        state = self.requests[self.rows[row].req_id]
        return torch.cat(state.window_queries[layer_name], dim=0).transpose(0, 1)

    def add_seconds(self, row: int, seconds: float) -> None:
        plan = self.rows.get(row)
        if plan is not None and plan.req_id in self.requests:
            self.requests[plan.req_id].seconds += seconds

    def rotary_of(self, layer_name: str) -> Any:
        """The layer's vLLM ``rotary_emb`` (``...self_attn.attn`` -> ``...self_attn.rotary_emb``)."""
        return self.model.get_submodule(layer_name[: -len("attn")] + "rotary_emb")

    def record_query_stats(self, layer_name: str, row: int, queries: torch.Tensor) -> None:
        """Un-rotate ``queries [n, H, d]`` (rows ``collect_lo..hi`` of row ``row``) and add them."""
        from vllm_kvevict.vllm.query_stats import QueryStats, rope_cos_sin, unrotate

        plan = self.rows[row]
        state = self.requests[plan.req_id]
        first = plan.start + plan.collect_lo
        cos, sin = rope_cos_sin(self.rotary_of(layer_name), torch.arange(first, first + queries.shape[0]))
        stats = state.query_stats.get(layer_name)
        if stats is None:
            keep_raw = QueryStats.keeps_raw(state.prompt_len, state.config.resolved_sinks, queries.shape[-1])
            stats = state.query_stats[layer_name] = QueryStats(keep_raw=keep_raw)
        stats.add(unrotate(queries.float().cpu(), cos, sin))

    def record_attention(self, layer_name: str, row: int, queries: torch.Tensor, keys: torch.Tensor, scale: float) -> None:
        """Add the attention that ``queries [n, H, d]`` (rows ``collect_lo..hi``) pay to the
        request's cached ``keys [Hkv, T, d]`` (causal: query at position p sees keys 0..p)."""
        plan = self.rows[row]
        state = self.requests[plan.req_id]
        first = plan.start + plan.collect_lo
        n, heads = queries.shape[0], queries.shape[1]
        total = state.attention_sum.get(layer_name)
        if total is None:
            total = state.attention_sum[layer_name] = torch.zeros(heads, state.prompt_len)
        k = keys.repeat_interleave(heads // keys.shape[0], dim=0)[:, : first + n].float()  # [H, T, d]
        cols = torch.arange(first + n).view(1, -1)
        for lo in range(0, n, _ATTENTION_ROWS):  # bounded [H, rows, T] temporaries
            q = queries[lo : lo + _ATTENTION_ROWS].float()
            logits = torch.einsum("nhd,htd->hnt", q, k) * scale
            causal = cols > (first + lo + torch.arange(q.shape[0])).view(-1, 1)
            total[:, : first + n] += torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1).sum(dim=1)

    def query_inputs(self, layer_name: str, row: int) -> dict:
        """Extra ``LayerInputs`` fields the request's scorer reads (empty if none)."""
        from vllm_kvevict.vllm.query_stats import FUTURE_POSITIONS, rope_cos_sin

        state = self.requests[self.rows[row].req_id]
        if needs_attention_sum(state.config):
            return {"attention_sum": state.attention_sum[layer_name]}
        if not needs_query_stats(state.config):
            return {}
        length = state.prompt_len
        cos, sin = rope_cos_sin(self.rotary_of(layer_name), torch.arange(length, length + FUTURE_POSITIONS))
        return {"queries_pre_rope": state.query_stats[layer_name].as_queries(), "rope_cos": cos, "rope_sin": sin}

    def record_scores(self, row: int, layer_idx: int, scores: torch.Tensor) -> None:
        self.requests[self.rows[row].req_id].scores[layer_idx] = scores

    def o_proj_of(self, layer_name: str) -> Optional[torch.Tensor]:
        """``[D, H*d]`` ``o_proj`` weight of the attention layer ``layer_name`` (``...self_attn.attn``
        -> ``...self_attn.o_proj``), from the loaded model; ``None`` if it cannot be found."""
        if layer_name not in self.o_proj:
            weight = None
            if self.model is not None and layer_name.endswith(".attn"):
                try:
                    module = self.model.get_submodule(layer_name[: -len("attn")] + "o_proj")
                    weight = linear_weight(module)
                except Exception as exc:
                    logger.warning("kvevict: no o_proj weight for %s: %s", layer_name, exc)
            self.o_proj[layer_name] = weight
        return self.o_proj[layer_name]

    def fail(self, row: int, exc: BaseException) -> None:
        plan = self.rows.get(row)
        if plan is not None and plan.req_id in self.requests:
            logger.warning("kvevict: scoring failed for %s, request left whole: %s", plan.req_id, exc)
            logger.debug("kvevict: scoring failure", exc_info=exc)
            if not self.requests[plan.req_id].failed:
                self.num_failed += 1
            self.requests[plan.req_id].failed = True


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """``[out, in]`` float32 weight of a vLLM linear layer, even when the platform repacked it.

    vLLM's CPU path packs unquantized weights for oneDNN/sgl kernels and leaves an empty
    ``weight``; then the layer's own GEMM applied to the identity gives ``I @ W^T = W^T``.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel() > 0:
        return weight.detach().float()
    in_features = getattr(module, "input_size_per_partition", None) or module.input_size
    dtype = getattr(weight, "dtype", torch.float32)
    eye = torch.eye(in_features, dtype=dtype)
    with torch.no_grad():
        out = module.quant_method.apply(module, eye, None)
    return out.float().t().contiguous()


#: Query rows per block when accumulating h2o's attention sums.
_ATTENTION_ROWS = 256

_STATE: Optional[WorkerEvictionState] = None


def get_worker_state() -> WorkerEvictionState:
    global _STATE
    if _STATE is None:
        _STATE = WorkerEvictionState()
    return _STATE


def compact_block_table(
    block_table: torch.Tensor, seq_lens: torch.Tensor, compact_rows: Mapping[int, torch.Tensor], block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block table and sequence lengths as the stock kernel must see them after eviction.

    For each row in ``compact_rows`` the evicted positional blocks are dropped (kept blocks in
    order, then the tail) and its length shrinks by ``len(evicted) * block_size``: keys are stored
    post-RoPE, so attention over the kept tokens is the stock kernel over this shorter sequence.

    Parameters
    ----------
    block_table : ``[num_reqs, max_blocks]`` int32 block ids (not modified).
    seq_lens : ``[num_reqs]`` int32 (not modified).
    compact_rows : row -> ``[E]`` int64 evicted positional block indices.

    Returns
    -------
    New ``(block_table, seq_lens)``; rows not in ``compact_rows`` are unchanged.
    """
    table = block_table.clone()
    lens = seq_lens.clone()
    width = table.shape[1]
    for row, evicted in compact_rows.items():
        if row >= table.shape[0] or evicted.numel() == 0:
            continue
        seq_len = int(lens[row])
        used = min(width, -(-seq_len // block_size))
        keep = torch.ones(used, dtype=torch.bool)
        keep[evicted[evicted < used]] = False
        kept_ids = block_table[row, :used][keep]
        table[row, : kept_ids.numel()] = kept_ids
        table[row, kept_ids.numel() : used] = 0
        lens[row] = seq_len - int((~keep).sum()) * block_size
    return table, lens


def compact_in_place(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: Optional[torch.Tensor],
    compact_rows: Mapping[int, torch.Tensor],
    block_size: int,
) -> int:
    """:func:`compact_block_table`, written into the runner's own per-step buffers.

    For Model Runner V2, whose block tables and sequence lengths are rebuilt into persistent
    buffers every step (so in-place edits last one step, and CUDA graphs read the edited
    buffers). ``seq_lens`` may live on the GPU; ``seq_lens_cpu`` is its CPU upper bound.

    Returns
    -------
    The largest compacted sequence length (0 if no row changed).
    """
    if not compact_rows:
        return 0
    rows = torch.tensor(sorted(r for r in compact_rows if r < block_table.shape[0]), dtype=torch.long)
    if rows.numel() == 0:
        return 0
    lens_cpu = seq_lens[rows].to("cpu", torch.int32)
    table, lens = compact_block_table(
        block_table[rows].cpu(), lens_cpu, {i: compact_rows[int(r)] for i, r in enumerate(rows)}, block_size
    )
    block_table[rows.to(block_table.device)] = table.to(block_table.device, block_table.dtype)
    seq_lens[rows.to(seq_lens.device)] = lens.to(seq_lens.device, seq_lens.dtype)
    if seq_lens_cpu is not None:
        seq_lens_cpu[rows] = lens.to(seq_lens_cpu.dtype)
    return int(lens.max())
