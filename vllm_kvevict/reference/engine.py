"""The reference engine: an HF causal LM whose KV cache is evicted per (layer, KV head).

Prefill once with the full cache, choose the kept tokens with a policy, copy them into real
per-head variable-length caches, then decode greedily. New tokens take their true positions
(``L, L+1, ...``) and kept keys keep the rotation they were cached with, as in vLLM.

Example
-------
>>> engine = ReferenceEngine(model_dir)
>>> prefilled = engine.prefill(engine.encode("..."))
>>> for budget in (1.0, 0.5, 0.2):
...     out = engine.generate(prefilled, EvictionConfig(scorer="snapkv", budget=budget), 32)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.identity import ModelIdentity
from vllm_kvevict.policies.base import LayerInputs
from vllm_kvevict.reference.continuation import Continuation, Continued, continuation_of, continue_forced
from vllm_kvevict.reference.decode_eviction import Chooser, DecodeEviction, DecodeEvictor, greedy_decode_evicting
from vllm_kvevict.reference.forward import greedy_decode, run_prompt, run_tokens
from vllm_kvevict.reference.head_cache import HeadCache
from vllm_kvevict.reference.key_only import merged, routed_cache
from vllm_kvevict.reference.model_parts import DecoderParts
from vllm_kvevict.reference.prefilled import FUTURE_POSITIONS, Prefilled
from vllm_kvevict.reference.selection import DEFAULT_BLOCK_SIZE, KeptIndices, select_kept, select_kept_set
from vllm_kvevict.vector.artifact import artifact_for

TokenIds = Union[torch.Tensor, Sequence[int]]


@dataclass
class Generation:
    """One greedy decode after eviction.

    Attributes
    ----------
    token_ids : generated ids (the EOS that stopped it included).
    text : ``token_ids`` decoded, special tokens skipped.
    kept : ``kept[layer][kv_head]`` sorted prompt indices each head kept (with VECTOR: whole
        and key-only ones).
    kept_per_head : ``[num_layers, Hkv]`` prompt tokens kept per head.
    memory_fraction : prompt slots kept / prompt tokens of the full cache, over all heads (two
        key-only tokens are one slot).
    prompt_len : ``L``.
    logits : ``[len(token_ids), V]`` logits each token was chosen from (``return_logits``).
    cache : the per-head cache after decoding (``return_cache``).
    decode_evictions : the decode-time evictions, in order (``config.decode_interval > 0``).
    key_only : VECTOR: ``key_only[layer][kv_head]`` the prompt indices kept as a key alone
        (a subset of ``kept``); ``None`` otherwise.
    state : where it stopped, to go on with :meth:`ReferenceEngine.continue_generation`
        (``return_state``).
    """

    token_ids: list[int]
    text: str
    kept: KeptIndices
    kept_per_head: torch.Tensor
    memory_fraction: float
    prompt_len: int
    logits: Optional[torch.Tensor] = None
    cache: Optional[HeadCache] = None
    decode_evictions: list[DecodeEviction] = field(default_factory=list)
    key_only: Optional[KeptIndices] = None
    state: Optional[Continuation] = None


class ReferenceEngine:
    """An HF transformers causal LM (Llama family) run with per-head evicted caches."""

    def __init__(self, model_dir: Union[str, Path], dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model.eval()
        self.parts = DecoderParts(self.model)
        self.eos_token_ids = _eos_ids(self.model, self.tokenizer)
        #: what ``lkv`` policies check their artifact against (the HF config's identity).
        self.identity = ModelIdentity.from_hf_config(self.model.config)

    # ------------------------------------------------------------------ prompt
    def encode(self, text: str, chat: bool = False) -> torch.Tensor:
        """Token ids ``[L]`` of ``text``; ``chat`` wraps it as one user turn of the chat template."""
        if chat:
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def prefill(self, input_ids: TokenIds, keep_queries: Optional[int] = None) -> Prefilled:
        """Run the prompt once with the full cache and capture what the policies read.

        ``keep_queries`` bounds how many of the last tokens' pre-RoPE queries are kept (``None``:
        all of them, needed by ``h2o``; window scorers need only the last ``window``).
        """
        ids = _as_ids(input_ids)
        L = ids.shape[0]
        passed = run_prompt(self.parts, ids, keep_queries)
        cos, sin = self.parts.rope_tables(torch.arange(L + FUTURE_POSITIONS))
        return Prefilled(
            input_ids=ids,
            keys=passed.keys,
            values=passed.values,
            queries_pre_rope=passed.queries_pre_rope,
            rope_cos=cos,
            rope_sin=sin,
            last_logits=passed.last_logits,
            o_proj=[self.parts.o_proj_weight(i).detach() for i in range(self.parts.num_layers)],
            scale=self.parts.scale,
            model=self.identity,
        )

    def layer_inputs(self, prefilled: Prefilled, config: EvictionConfig) -> list[LayerInputs]:
        return prefilled.layer_inputs(config)

    # ------------------------------------------------------------------ eviction + decode
    def kept_indices(
        self, prefilled: Prefilled, config: EvictionConfig, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> KeptIndices:
        """``kept[layer][kv_head]``: the prompt tokens ``config`` keeps (all of them at budget 1);
        with VECTOR the whole ones (:meth:`kept_set` has the key-only ones too)."""
        return select_kept(prefilled, config, block_size)

    def kept_set(self, prefilled: Prefilled, config: EvictionConfig, block_size: int = DEFAULT_BLOCK_SIZE):
        """The policy's :class:`~vllm_kvevict.policies.KeptSet` (head granularity), or the kept
        indices (page granularity, or a budget that keeps everything)."""
        return select_kept_set(prefilled, config, block_size)

    def build_cache(self, prefilled: Prefilled, kept: KeptIndices, reserve: int = 0) -> HeadCache:
        """Fresh per-head caches holding only the kept tokens (``prefilled`` is not modified)."""
        return HeadCache.from_kept(prefilled.keys, prefilled.values, kept, reserve=reserve)

    @torch.no_grad()
    def generate(
        self,
        prefilled: Prefilled,
        config: EvictionConfig,
        max_new_tokens: int,
        stop_on_eos: bool = True,
        *,
        suffix_ids: Optional[TokenIds] = None,
        kept: Optional[KeptIndices] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        return_logits: bool = False,
        return_cache: bool = False,
        decode_choices: Optional[Chooser] = None,
        return_state: bool = False,
    ) -> Generation:
        """Evict with ``config``, then decode greedily.

        Parameters
        ----------
        suffix_ids : tokens fed after eviction, before decoding (e.g. a question that comes after
            the compressed context); they take positions ``L, L+1, ...`` and are never evicted.
        kept : kept indices (``kept[layer][kv_head]``, or a ``KeptSet``) to use instead of the
            policy's, e.g. another implementation's choice.
        block_size : page size for ``granularity="page"``.
        decode_choices : forces each decode-time eviction's evicted blocks (``config.decode_interval
            > 0``; :mod:`~vllm_kvevict.reference.decode_eviction`), e.g. the served plugin's.
        return_state : keep the cache (and the decode-time evictor) to continue this generation
            (:meth:`continue_generation`).
        """
        if kept is None:
            kept = self.kept_set(prefilled, config, block_size)
        key_only = getattr(kept, "key_only", None)
        if hasattr(kept, "indices"):
            kept = kept.indices
        suffix = _as_ids(suffix_ids) if suffix_ids is not None else torch.empty(0, dtype=torch.long)
        if prefilled.last_logits is None and not suffix.numel():
            raise ValueError("a prefix prefill has no next-token logits: give suffix_ids")
        reserve = suffix.numel() + max_new_tokens
        if key_only is None:
            cache = self.build_cache(prefilled, kept, reserve=reserve)
        else:
            artifact = artifact_for(prefilled.model, config.vector_artifact)
            cache = routed_cache(prefilled.keys, prefilled.values, kept, key_only, artifact, reserve=reserve)
            kept = merged(kept, key_only)
        kept_per_head = cache.lengths()
        L = prefilled.prompt_len
        approximated = sum(int(idx.numel()) for row in key_only for idx in row) if key_only is not None else 0
        memory_fraction = (float(kept_per_head.sum()) - approximated / 2) / (kept_per_head.numel() * L)

        position = L
        logits = prefilled.last_logits
        if suffix.numel():
            positions = torch.arange(position, position + suffix.numel())
            logits = run_tokens(self.parts, cache, suffix, positions)[-1]
            position += suffix.numel()
        stop_ids = self.eos_token_ids if stop_on_eos else frozenset()
        evictor = None
        if config.evicts_during_decode:
            evictor = DecodeEvictor(self.parts, config, block_size, position, prefilled.model, decode_choices)
            if evictor.policy.needs.attention_sums:
                if suffix.numel():
                    raise ValueError("h2o's decode-time eviction after suffix_ids: the suffix's attention is not summed")
                evictor.start_sums(cache, [prefilled.attention_sum(layer) for layer in range(prefilled.num_layers)])
            tokens, step_logits = greedy_decode_evicting(evictor, cache, logits, position, max_new_tokens, stop_ids)
        else:
            tokens, step_logits = greedy_decode(self.parts, cache, logits, position, max_new_tokens, stop_ids)
        return Generation(
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            kept=kept,
            kept_per_head=kept_per_head,
            memory_fraction=memory_fraction,
            prompt_len=L,
            logits=step_logits if return_logits else None,
            cache=cache if return_cache else None,
            decode_evictions=list(evictor.evictions) if evictor is not None else [],
            key_only=key_only,
            state=continuation_of(cache, evictor, tokens, position) if return_state else None,
        )

    def continue_generation(self, state: Continuation, forced_ids: TokenIds, max_new_tokens: int,
                            stop_on_eos: bool = True) -> Continued:
        """Go on from ``state`` (a :class:`Generation`'s, or a previous continuation's): its last
        token and ``forced_ids`` are run on its cache as if chosen (decode-time eviction goes on
        over them), then up to ``max_new_tokens`` greedy tokens. ``state`` is advanced in place."""
        stop_ids = self.eos_token_ids if stop_on_eos else frozenset()
        return continue_forced(self.parts, state, _as_ids(forced_ids).tolist(), max_new_tokens, stop_ids)


def _as_ids(ids: TokenIds) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ValueError(f"one sequence at a time, got a batch of {t.shape[0]}")
        t = t[0]
    return t


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)
