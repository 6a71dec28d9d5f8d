"""Seeded RULER-style tasks sized in the model's own tokens.

A :class:`Task` is one chat-formatted prompt, its expected answers and where its context ends.
Under the default protocol (``question_position="after"``) the prompt is

    <chat prefix> header + context | "\\n\\n" + question <chat suffix, generation prompt> answer prefix

and ``prompt_ids[:context_end]`` is the part an eviction policy compresses; the question is
not in it (kvpress's ``context``/``question`` split, the harder protocol). With
``question_position="both"`` the question is also stated before the header, so it sits inside
the compressed part.

The requested length is the length of the whole prompt (as in RULER), in tokens of the given
tokenizer; the result is the largest layout not longer than it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from vllm_kvevict.evaluation.kinds import KINDS, Draft
from vllm_kvevict.evaluation.scoring import score

__all__ = ["Task", "KINDS", "make_task", "make_suite", "score", "DEFAULT_KINDS"]

QUESTION_POSITIONS = ("after", "both")
#: Kinds of the default suite (all of them).
DEFAULT_KINDS: tuple[str, ...] = tuple(KINDS)


@dataclass(frozen=True)
class Task:
    """One generated prompt.

    Attributes
    ----------
    kind : a key of :data:`KINDS`.
    prompt : the chat-formatted prompt (``apply_chat_template(..., add_generation_prompt=True)``),
        then the answer prefix (if asked for).
    prompt_ids : its tokens (``len`` ~ ``context_tokens``, never more).
    answers : every string a correct output contains (scored by :func:`score`).
    context_tokens : the requested prompt length (the length bucket the task belongs to).
    max_new_tokens : decode budget.
    context_end : ``prompt_ids[:context_end]`` is chat prefix + header + context (the
        compressed part); ``prompt_ids[context_end:]`` is the question and the generation prompt.
    seed, question_position, question, answer_prefix : how it was made.
    """

    kind: str
    prompt: str
    prompt_ids: list[int]
    answers: list[str]
    context_tokens: int
    max_new_tokens: int
    context_end: int
    seed: int
    question_position: str
    question: str = field(repr=False)
    answer_prefix: str = field(default="", repr=False)

    @property
    def uid(self) -> str:
        return f"{self.kind}-{self.context_tokens}-{self.question_position}-{self.seed}"

    @property
    def context_ids(self) -> list[int]:
        return self.prompt_ids[: self.context_end]

    @property
    def question_ids(self) -> list[int]:
        return self.prompt_ids[self.context_end :]

    def to_json(self) -> dict:
        """Plain fields for a JSON line (no token ids)."""
        return {
            "uid": self.uid,
            "kind": self.kind,
            "context_tokens": self.context_tokens,
            "prompt_tokens": len(self.prompt_ids),
            "context_end": self.context_end,
            "answers": list(self.answers),
            "seed": self.seed,
            "question_position": self.question_position,
        }


def _tokens(tokenizer, s: str) -> list[int]:
    return list(tokenizer(s, add_special_tokens=False)["input_ids"])


def _layout(draft: Draft, tokenizer, n: int, question_position: str, answer_prefix: bool):
    """Chat-format the draft with ``n`` filler units; return (prompt, head ids, tail ids, answers)."""
    context, answers = draft.render(n)
    before = f"{draft.question}\n\n" if question_position == "both" else ""
    tail_text = "\n\n" + draft.question
    content = f"{before}{draft.header}\n\n{context}{tail_text}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if answer_prefix:
        prompt += draft.answer_prefix
    cut = prompt.rindex(tail_text)
    return prompt, _tokens(tokenizer, prompt[:cut]), _tokens(tokenizer, prompt[cut:]), answers


def make_task(
    kind: str, tokenizer, context_tokens: int, seed: int, question_position: str = "after", answer_prefix: bool = True
) -> Task:
    """Build one task of ``kind`` whose prompt is at most (and close to) ``context_tokens`` tokens.

    Parameters
    ----------
    kind : a key of :data:`KINDS`.
    tokenizer : a Hugging Face tokenizer with a chat template (the model's own).
    context_tokens : requested prompt length in tokens.
    seed : the same ``(kind, tokenizer, context_tokens, seed, question_position)`` always
        gives the same task.
    question_position : ``"after"`` (question only after the context) or ``"both"``.
    answer_prefix : end the prompt with RULER's answer prefix (e.g. ``"The special magic number
        for quiet-river mentioned in the provided text is"``) after the generation prompt, so the
        model answers at once.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")
    if question_position not in QUESTION_POSITIONS:
        raise ValueError(f"question_position must be one of {QUESTION_POSITIONS}, got {question_position!r}")
    draft = KINDS[kind](random.Random(f"{kind}-{seed}"))

    def length(n: int) -> int:
        _, head, tail, _ = _layout(draft, tokenizer, n, question_position, answer_prefix)
        return len(head) + len(tail)

    if length(0) > context_tokens:
        raise ValueError(f"{kind}: {context_tokens} tokens cannot hold the task ({length(0)} without filler)")
    lo, hi = 0, 16  # invariant: length(lo) <= target; grow hi until length(hi) > target
    while length(hi) <= context_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) <= context_tokens:
            lo = mid
        else:
            hi = mid
    prompt, head, tail, answers = _layout(draft, tokenizer, lo, question_position, answer_prefix)
    return Task(
        kind=kind,
        prompt=prompt,
        prompt_ids=head + tail,
        answers=list(answers),
        context_tokens=context_tokens,
        max_new_tokens=draft.max_new_tokens,
        context_end=len(head),
        seed=seed,
        question_position=question_position,
        question=draft.question,
        answer_prefix=draft.answer_prefix if answer_prefix else "",
    )


def make_suite(
    kinds: Iterable[str],
    tokenizer,
    lengths: Sequence[int],
    n_per: int,
    seed: int,
    question_position: str = "after",
    answer_prefix: bool = True,
) -> list[Task]:
    """``n_per`` tasks for every kind x length, ordered by length, then kind, then index.

    Task ``i`` of a (kind, length) cell has seed ``seed * 100_003 + i``, so a larger ``n_per``
    extends a suite without changing its first tasks.
    """
    kinds = list(kinds)
    return [
        make_task(kind, tokenizer, length, seed * 100_003 + i, question_position, answer_prefix)
        for length in lengths
        for kind in kinds
        for i in range(n_per)
    ]
