"""Where a generated task's evidence sits in its prompt, and how much of it each head kept.

The evidence of a task is every occurrence of one of its answers inside the compressed part of
the prompt before the question (a needle's number, a variable's name, a resident's city). One
occurrence is one *span*: the tokens that must stay together for the model to copy it (SmolLM2
writes a number one digit per token, so a 7-digit needle is a span of 7 tokens).

Each (layer, KV head) either keeps a span whole, keeps part of it, or loses it. What it misses
is *visible* when the head's window attention (SnapKV's signal, same window and pooling) ranks
at least half of the missing tokens inside the head's kept count: the decode-side signal found
them and the selector ranked them out anyway. Otherwise it is *hidden*: the signal never found
them (lost whole) or found only part of the span (kept part).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

#: Per (layer, head, span): what the head kept of the span, and whether what it misses is visible.
STATUSES = ("kept", "partial_hidden", "partial_visible", "lost_visible", "lost_hidden")


@dataclass(frozen=True)
class Span:
    """One evidence occurrence: prompt tokens ``[start, end)`` spelling ``answer``."""

    answer: str
    start: int
    end: int

    @property
    def tokens(self) -> torch.Tensor:
        return torch.arange(self.start, self.end)

    def to_json(self) -> dict:
        return {"answer": self.answer, "start": self.start, "end": self.end}


def context_text(task) -> str:
    """The prompt text before the question (what ``task.context_ids`` tokenize)."""
    cut = task.prompt.rindex("\n\n" + task.question)
    return task.prompt[:cut]


def evidence_spans(task, tokenizer) -> list[Span]:
    """Every answer occurrence in the task's context, as token spans of ``task.prompt_ids``.

    Raises ``ValueError`` when the context's own tokenization does not give ``task.context_ids``
    (offsets would then point at the wrong tokens).
    """
    text = context_text(task)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(task.context_ids):
        raise ValueError(f"{task.uid}: the context does not tokenize to the task's context_ids")
    return spans_from_offsets(text, enc["offset_mapping"], task.answers)


def spans_from_offsets(text: str, offsets: Sequence[tuple[int, int]], answers: Sequence[str]) -> list[Span]:
    """Token spans of each word-bounded, case-insensitive occurrence of each answer in ``text``
    (``offsets[i]``: the characters token ``i`` covers), in prompt order."""
    spans = []
    for answer in dict.fromkeys(answers):
        pattern = r"(?<![0-9A-Za-z])" + re.escape(answer.lower()) + r"(?![0-9A-Za-z])"
        for match in re.finditer(pattern, text.lower()):
            covering = [i for i, (s, e) in enumerate(offsets) if s < match.end() and e > match.start()]
            if covering:
                spans.append(Span(answer, covering[0], covering[-1] + 1))
    return sorted(spans, key=lambda s: s.start)


def span_status(kept: torch.Tensor, span: Span, attention_rank: torch.Tensor, head_kept: int) -> str:
    """One of :data:`STATUSES` for one head.

    Parameters
    ----------
    kept : ``[L]`` bool, the head's kept prompt tokens.
    attention_rank : ``[L]`` int64, the head's window-attention rank of each token (0 first).
    head_kept : how many tokens the head keeps (what "inside its kept count" means).
    """
    held = kept[span.start : span.end]
    missing = int((~held).sum())
    if missing == 0:
        return "kept"
    visible = int(((attention_rank[span.start : span.end] < head_kept) & ~held).sum())
    return ("partial_" if bool(held.any()) else "lost_") + ("visible" if 2 * visible >= missing else "hidden")


def coverage(kept_masks: list[torch.Tensor], spans: Sequence[Span], attention_ranks: list[torch.Tensor]) -> list[list[list[str]]]:
    """``status[layer][head][span]`` for per-layer ``[Hkv, L]`` kept masks and attention ranks."""
    out = []
    for mask, ranks in zip(kept_masks, attention_ranks):
        row = []
        for head in range(mask.shape[0]):
            n = int(mask[head].sum())
            row.append([span_status(mask[head], s, ranks[head], n) for s in spans])
        out.append(row)
    return out


def count_statuses(status: list[list[list[str]]]) -> dict[str, int]:
    """How many (layer, head, span) triples have each status."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in status:
        for per_head in row:
            for s in per_head:
                counts[s] += 1
    return counts


def evidence_mask(spans: Sequence[Span], prompt_len: int) -> torch.Tensor:
    """``[L]`` bool: tokens inside any span."""
    mask = torch.zeros(prompt_len, dtype=torch.bool)
    for s in spans:
        mask[s.start : s.end] = True
    return mask
