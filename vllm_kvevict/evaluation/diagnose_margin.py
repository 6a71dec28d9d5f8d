"""The unit of cost: the answer's log-likelihood given one compressed cache.

One teacher-forced reference forward (:func:`~vllm_kvevict.reference.forward.run_tokens`) of
the question (protocol ``after``) and the answer's tokens but the last, over fresh per-head
caches holding the kept tokens. Under protocol ``inside`` the first answer token is read from
the full-cache logits after the prompt, as the engine's (and vLLM's) first decoded token is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvevict.reference.forward import run_tokens
from vllm_kvevict.reference.head_cache import HeadCache


@dataclass(frozen=True)
class AnswerFit:
    """How well one cache predicts the answer.

    Attributes
    ----------
    loglik : sum over answer tokens of ``log p(token)`` (nats).
    greedy : whether greedy decoding would write exactly the answer tokens (every argmax right).
    """

    loglik: float
    greedy: bool


def answer_ids(tokenizer, answers) -> list[int]:
    """The tokens of the gold answer as the model would continue the answer prefix: a space, the
    answers joined by ``", "``."""
    return list(tokenizer(" " + ", ".join(answers), add_special_tokens=False)["input_ids"])


def shortest_correct(task, tokenizer, token_ids: list[int]) -> list[int] | None:
    """The shortest prefix of ``token_ids`` whose text scores 1 on ``task`` and does not end inside
    a word or number of the whole output (``None``: no prefix does)."""
    from vllm_kvevict.evaluation.scoring import score

    whole = tokenizer.decode(token_ids, skip_special_tokens=True)
    for k in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:k], skip_special_tokens=True)
        cut_inside = whole.startswith(text) and len(whole) > len(text) and whole[len(text)].isalnum()
        if not cut_inside and score(task, text) == 1:
            return list(token_ids[:k])
    return None


def fit_of(logits: torch.Tensor, target: torch.Tensor) -> AnswerFit:
    """:class:`AnswerFit` of ``logits [T, V]`` predicting ``target [T]``."""
    logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, target.view(-1, 1)).sum()
    return AnswerFit(float(logp), bool((logits.argmax(-1) == target).all()))


@torch.no_grad()
def answer_fit(parts, prefilled, kept, suffix_ids: torch.Tensor, target_ids: torch.Tensor) -> AnswerFit:
    """Fit of ``target_ids`` after ``prefilled`` compressed to ``kept[layer][head]``, then
    ``suffix_ids`` (may be empty) at positions ``L, L+1, ...``."""
    L = prefilled.prompt_len
    fed = torch.cat([suffix_ids, target_ids[:-1]])
    cache = HeadCache.from_kept(prefilled.keys, prefilled.values, kept, reserve=int(fed.numel()))
    logits = run_tokens(parts, cache, fed, torch.arange(L, L + fed.numel())) if fed.numel() else None
    if suffix_ids.numel():
        predicting = logits[suffix_ids.numel() - 1 :]
    else:
        if prefilled.last_logits is None:
            raise ValueError("a prefix prefill has no next-token logits: give suffix_ids")
        first = prefilled.last_logits.view(1, -1)
        predicting = first if logits is None else torch.cat([first, logits])
    return fit_of(predicting, target_ids)
