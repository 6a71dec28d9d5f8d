"""Which scorers the Triton kernels score from the paged cache, and how their scores are made.

A :class:`KernelRecipe` says what the kernels compute on the device for one layer of one
request (per query head window statistics of :func:`vllm_kvevict.kernels.window_scores` over the
last ``window`` prompt queries; value norms of :func:`vllm_kvevict.kernels.paged_value_norms`),
and how the scorer's :class:`~vllm_kvevict.policies.LayerScores` are made from those on the host
(:class:`LayerStats`), with the reference's own operations in the reference's order: pooling
(:func:`~vllm_kvevict.policies.ops.pool_tokens`), group means, the protected tail, CriticalKV's
stages. The one difference from ``policy.score_layer`` is how the window attention and the
norms are computed (bf16 products with float32 accumulation, ``exp2``), so scores agree to
rounding (``tests/unit/test_gpu_scoring.py`` checks each recipe against ``policy.score_layer``).

Covered: ``snapkv`` / ``pyramidkv`` (``SnapKV``, any pooling), ``tova``, ``laprox``,
``streamingllm`` (no kernel at all), and ``criticalkv`` around a covered base; each inside the
``Protected`` wrapper. :func:`kernel_recipe` returns ``None`` for every other scorer: those
score through the torch reference on gathered tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from vllm_kvevict.policies import LayerInputs, LayerScores, Protected, Scorer, rank, window_and_sinks
from vllm_kvevict.policies.ops import candidates_then_protected, group_mean, pool_tokens
from vllm_kvevict.policies.scorers import TOVA, CriticalKV, LaProx, SnapKV, StreamingLLM


@dataclass(frozen=True)
class LayerStats:
    """One layer's kernel results for one request, on the host.

    Attributes
    ----------
    window : name -> ``[H, L]`` float32 window statistic per query head (``mean``, ``sumsq``).
    value_norms : ``[H, L]`` float32 ``||v Wo[h]||_p`` or ``None``.
    """

    seq_len: int
    num_kv_heads: int
    num_heads: int
    layer_idx: int
    num_layers: int
    window: dict[str, torch.Tensor]
    value_norms: Optional[torch.Tensor] = None

    def shape_inputs(self) -> LayerInputs:
        """A :class:`LayerInputs` with this layer's sizes and place but no data (``d = 0``): what
        allocators and data-free scorers read."""
        length = self.seq_len
        return LayerInputs(keys=torch.empty(self.num_kv_heads, length, 0),
                           values=torch.empty(self.num_kv_heads, length, 0),
                           queries=torch.empty(self.num_heads, 0, 0), positions=torch.arange(length),
                           layer_idx=self.layer_idx, num_layers=self.num_layers)


#: ``assemble(stats, page)``: the layer's scores; ``page``: the scorer's page variant.
Assemble = Callable[[LayerStats, bool], LayerScores]


@dataclass(frozen=True)
class KernelRecipe:
    """What the kernels compute for a scorer's layer, and how its scores are made of that.

    ``window``: window query rows the statistics read (0: no window kernel); ``stats``: their
    names (:data:`vllm_kvevict.kernels.STATISTICS`), per query head; ``norm``: value-norm ``p``
    (0: none); ``assemble``: see :data:`Assemble`.
    """

    window: int
    stats: tuple[str, ...]
    norm: int
    assemble: Assemble


def kernel_recipe(scorer: Scorer) -> Optional[KernelRecipe]:
    """The recipe of ``scorer`` (as :func:`vllm_kvevict.policies.build_scorer` made it), or
    ``None`` when the kernels do not cover it. Exact types only: a subclass may score otherwise."""
    make = RECIPES.get(type(scorer))
    return make(scorer) if make is not None else None


def _protected(scorer: Protected) -> Optional[KernelRecipe]:
    inner = kernel_recipe(scorer.inner)
    if inner is None:
        return None

    def assemble(stats: LayerStats, page: bool) -> LayerScores:
        mask = window_and_sinks(stats.seq_len, scorer.window, scorer.sinks)
        return inner.assemble(stats, page).protect(mask)

    return replace(inner, assemble=assemble)


def _snapkv(scorer: SnapKV) -> KernelRecipe:
    def assemble(stats: LayerStats, page: bool) -> LayerScores:
        length = stats.seq_len
        window = min(scorer.window, length)
        scores = pool_tokens(stats.window["mean"][:, : length - window], scorer.kernel, scorer.pooling)
        candidates = scores.view(stats.num_kv_heads, stats.num_heads // stats.num_kv_heads, -1).mean(1)
        return candidates_then_protected(candidates, length)

    return KernelRecipe(window=scorer.window, stats=("mean",), norm=0, assemble=assemble)


def _tova(scorer: TOVA) -> KernelRecipe:
    def assemble(stats: LayerStats, page: bool) -> LayerScores:
        length = stats.seq_len
        attention = stats.window["mean"][:, : length - 1]  # the last query's row, [H, L - 1]
        return candidates_then_protected(attention.mean(0).expand(stats.num_kv_heads, -1), length)

    return KernelRecipe(window=1, stats=("mean",), norm=0, assemble=assemble)


def _laprox(scorer: LaProx) -> KernelRecipe:
    def assemble(stats: LayerStats, page: bool) -> LayerScores:
        length = stats.seq_len
        candidates = length - min(scorer.window, length)
        spread = stats.window["sumsq"][:, :candidates].sqrt()  # L2 over the window queries
        scores = group_mean(spread * stats.value_norms[:, :candidates], stats.num_kv_heads)
        scores = pool_tokens(scores, scorer.kernel, "avg")
        return candidates_then_protected(scores / scores.sum().clamp_min(1e-30), length)

    return KernelRecipe(window=scorer.window, stats=("sumsq",), norm=2, assemble=assemble)


def _streamingllm(scorer: StreamingLLM) -> KernelRecipe:
    return KernelRecipe(window=0, stats=(), norm=0, assemble=lambda stats, page: scorer.score(stats.shape_inputs()))


def _criticalkv(scorer: CriticalKV) -> Optional[KernelRecipe]:
    base = kernel_recipe(scorer.base)
    if base is None or base.norm not in (0, 1):
        return None
    allocation = scorer.allocation

    def assemble(stats: LayerStats, page: bool) -> LayerScores:
        first = base.assemble(stats, False)  # CriticalKV reads its base's own token scores
        values = (first.values + scorer.epsilon) * group_mean(stats.value_norms, stats.num_kv_heads)
        if page:
            return LayerScores(values=values, protected=first.protected)
        length = stats.seq_len
        if allocation.per_layer:
            budgets = allocation.split_layer(first, stats.shape_inputs())
        else:
            budgets = torch.full((stats.num_kv_heads,), allocation.config.budget_tokens(length), dtype=torch.int64)
        stage1 = rank(first) < scorer.stage1_counts(budgets, length)[:, None]
        return LayerScores(values=values, protected=first.protected, preferred=stage1 & ~first.protected,
                           head_budgets=budgets if allocation.per_layer else None)

    return KernelRecipe(window=base.window, stats=base.stats, norm=1, assemble=assemble)


#: scorer type -> its recipe's maker.
RECIPES: dict[type, Callable[[Scorer], Optional[KernelRecipe]]] = {
    Protected: _protected,
    SnapKV: _snapkv,
    TOVA: _tova,
    LaProx: _laprox,
    StreamingLLM: _streamingllm,
    CriticalKV: _criticalkv,
}
