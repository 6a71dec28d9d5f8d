"""A policy: the scorer and the plan a config asks for, built once for one block size.

:func:`build_policy` is where the config's job ends; the vLLM plugin and the reference engine
call the same three methods of the :class:`Policy` it returns:

* :meth:`Policy.score_layer` per layer, on the tokens the configured granularity selects from;
* :meth:`Policy.plan_head` (head granularity): every (layer, KV head)'s kept tokens;
* :meth:`Policy.evicted_blocks` (page granularity): the prompt blocks every layer and head drop.

Policies that read a trained artifact (scorer or allocation ``lkv``, ``vector`` on) need the model they run on:
``build_policy(config, block_size, model=ModelIdentity.from_hf_config(...))`` (or a callable
giving the identity, resolved when the policy first scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.artifact import LKVSource
from vllm_kvevict.policies.allocators.lkv import LKVShares
from vllm_kvevict.policies.base import LayerInputs, LayerScores, Needs, Scorer
from vllm_kvevict.policies.head_page_select import plan_head_pages
from vllm_kvevict.policies.pages import evicted_blocks
from vllm_kvevict.policies.registry import build_scorer
from vllm_kvevict.policies.select import KeptSet, plan_kept
from vllm_kvevict.policies.vector import VectorResiduals, convertible_heads, plan_vector
from vllm_kvevict.vector.artifact import VectorSource


@dataclass(frozen=True)
class Policy:
    """``config``'s scorer (window and sinks protected) and plan, for pages of ``block_size``."""

    config: EvictionConfig
    block_size: int
    scorer: Scorer

    @property
    def needs(self) -> Needs:
        """What :meth:`score_layer` reads beyond keys and values."""
        return self.scorer.needs

    @property
    def whole_pages(self) -> bool:
        """Whether selection keeps whole pages: page granularity, or whole pages per head."""
        if self.config.resolved_granularity == "page":
            return True
        return self.config.head_selection_for(self.block_size) == "page"

    def score_layer(self, inputs: LayerInputs) -> LayerScores:
        """``[Hkv, L]`` scores of one layer: the scorer's page variant for whole pages, its
        own token scores for single tokens per head."""
        if self.whole_pages:
            return self.scorer.page_score(inputs)
        return self.scorer.score(inputs)

    def plan_head(self, scores: list[LayerScores], seq_len: int) -> KeptSet:
        """Head granularity's kept set from per-layer :meth:`score_layer` scores: whole
        block-aligned pages per head, or single tokens; with VECTOR, whole and key-only tokens
        (:func:`~vllm_kvevict.policies.vector.plan_vector`)."""
        if self.config.vector == "on":
            gate = self.config.vector_min_r2
            convertible = convertible_heads(self.vector_artifact(), gate) if gate > 0 else None
            return plan_vector(scores, self.config, seq_len, convertible)
        if self.config.head_selection_for(self.block_size) == "page":
            return plan_head_pages(scores, self.config, seq_len, self.block_size)
        return plan_kept(scores, self.config, seq_len)

    def vector_artifact(self) -> Any:
        """VECTOR's :class:`~vllm_kvevict.vector.VectorArtifact` (the one its residuals read, which
        rebuilds key-only values at attention time), or ``None`` without VECTOR."""
        return self.scorer.source.artifact() if isinstance(self.scorer, VectorResiduals) else None

    def evicted_blocks(self, scores: list[LayerScores], seq_len: int, budget: Optional[int] = None) -> list[int]:
        """Page granularity: sorted indices of the blocks of ``seq_len`` scored tokens to evict
        (positional after prefill; of the held blocks at decode time, with the ``budget`` of the
        request's whole length)."""
        return evicted_blocks(scores, seq_len, self.block_size, self.config, budget)


def policy_scorer(config: EvictionConfig, model: Any = None) -> Scorer:
    """The configured scorer, window and sinks protected, with LKV-H's head shares attached
    under allocation ``lkv`` and VECTOR's residuals with ``vector`` on."""
    scorer = build_scorer(config, model=model)
    if config.enabled and config.resolved_allocation == "lkv":
        scorer = LKVShares(scorer, LKVSource(model=model, path=config.lkv_artifact), config)
    if config.enabled and config.vector == "on":
        scorer = VectorResiduals(scorer, VectorSource(model=model, path=config.vector_artifact),
                                 relative=config.vector_residual == "relative")
    return scorer


def build_policy(config: EvictionConfig, block_size: int, model: Any = None) -> Policy:
    """The :class:`Policy` of ``config`` for a KV cache of ``block_size``-token pages.

    ``model``: the :class:`~vllm_kvevict.lkv.identity.ModelIdentity` of the model served (or a
    callable giving it), read by the ``lkv`` scorer and allocation only.
    """
    return Policy(config=config, block_size=block_size, scorer=policy_scorer(config, model))


def compute_kept(layers: list[LayerInputs], config: EvictionConfig, model: Any = None) -> KeptSet:
    """Single tokens per head from the scorer's own scores (:func:`plan_kept`), whatever the
    granularity: what kvpress's presses keep (the parity tests)."""
    scorer = policy_scorer(config, model)
    return plan_kept([scorer.score(layer) for layer in layers], config, layers[0].seq_len)
