"""Training and validation examples: the generated tasks of ``vllm_kvevict.evaluation`` and the
continuation of plain generated text.

An :class:`Example` says what is compressed (the context, or the whole prompt) and what is fed
after it. Example ``i`` of a run is a pure function of ``(seed, i)``, so a resumed run sees the
same stream. Task seeds are drawn from :data:`TRAIN_SEEDS` (training) or :data:`VALIDATION_SEEDS`
(the training curve), both above every seed ``make_suite`` gives the benchmarks (``seed * 100_003
+ i`` for ``seed < 9``), and the held-out kinds never appear in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from vllm_kvevict.evaluation import text
from vllm_kvevict.evaluation.kinds import KINDS
from vllm_kvevict.evaluation.tasks import make_task

#: Task seeds of training examples, and of the validation examples of the training curve.
TRAIN_SEEDS = range(1_000_000, 2_000_000)
VALIDATION_SEEDS = range(3_000_000, 4_000_000)
#: Kinds never trained on (the benchmark reports them apart).
DEFAULT_HELD_OUT: tuple[str, ...] = ("niah_multivalue", "qa")
#: The plain-text kind (continuation of generated text).
CONTINUATION = "continuation"
#: Tokens of text fed after a compressed plain text.
CONTINUATION_TOKENS = 48
#: ``after``: the context is compressed, the question and answer are fed after it; ``inside``:
#: the whole prompt is compressed, the answer is fed after it.
PROTOCOLS = ("after", "inside")


@dataclass(frozen=True)
class Example:
    """One training or validation example.

    Attributes
    ----------
    kind : a task kind, or :data:`CONTINUATION`.
    protocol : one of :data:`PROTOCOLS` (``after`` for continuations).
    seed : the task's (or text's) seed.
    compressed_ids : the tokens prefilled, then compressed.
    fed_ids : tokens fed after eviction before the teacher's answer (the question; for a
        continuation, the text's next tokens); may be empty.
    max_new_tokens : the teacher's answer length bound (0: no answer, a continuation).
    """

    kind: str
    protocol: str
    seed: int
    compressed_ids: list[int]
    fed_ids: list[int]
    max_new_tokens: int


def plain_text_ids(tokenizer, seed: int, tokens: int) -> list[int]:
    """At least ``tokens`` token ids of generated essay text that repeats itself.

    A document draws 12 sentences; every next sentence is one of those (half of the time) or a
    fresh one, so a continuation is partly predictable from what the context kept.
    """
    rng = random.Random(f"lkv-text-{seed}")
    recurring = [text.essay_sentence(rng) for _ in range(12)]
    sentences: list[str] = []
    ids: list[int] = []
    while len(ids) < tokens:
        for _ in range(32):
            sentences.append(rng.choice(recurring) if rng.random() < 0.5 else text.essay_sentence(rng))
        ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
    return list(ids)


def make_example(tokenizer, kind: str, length: int, seed: int, protocol: str) -> Example:
    """The example of ``kind`` (a task kind or :data:`CONTINUATION`) at ``length`` tokens."""
    if kind == CONTINUATION:
        ids = plain_text_ids(tokenizer, seed, length + CONTINUATION_TOKENS)
        return Example(kind, "after", seed, ids[:length], ids[length : length + CONTINUATION_TOKENS], 0)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    task = make_task(kind, tokenizer, length, seed)
    if protocol == "after":
        return Example(kind, protocol, seed, task.context_ids, task.question_ids, task.max_new_tokens)
    return Example(kind, protocol, seed, list(task.prompt_ids), [], task.max_new_tokens)


def check_kinds(train_kinds: Sequence[str], held_out: Sequence[str]) -> None:
    """Refuse unknown kinds, and a held-out kind among the training ones."""
    known = set(KINDS) | {CONTINUATION}
    for name in list(train_kinds) + list(held_out):
        if name not in known:
            raise ValueError(f"unknown kind {name!r}; known: {', '.join(sorted(known))}")
    overlap = set(train_kinds) & set(held_out)
    if overlap:
        raise ValueError(f"kinds both trained on and held out: {', '.join(sorted(overlap))}")


@dataclass(frozen=True)
class Stream:
    """The examples of one training run: example ``i`` from ``(seed, i)`` alone.

    Attributes
    ----------
    kinds : task kinds drawn from (uniformly), :data:`CONTINUATION` included if wanted.
    lengths : prompt lengths in tokens (uniformly).
    inside_share : probability of protocol ``inside`` for a task.
    seed : the run's seed.
    seeds : the task seeds drawn from (:data:`TRAIN_SEEDS` or :data:`VALIDATION_SEEDS`).
    """

    kinds: tuple[str, ...]
    lengths: tuple[int, ...]
    inside_share: float
    seed: int
    seeds: range = TRAIN_SEEDS

    def spec(self, index: int) -> tuple[str, int, int, str]:
        """``(kind, length, task seed, protocol)`` of example ``index``."""
        rng = random.Random(f"lkv-stream-{self.seed}-{index}")
        kind = rng.choice(self.kinds)
        length = rng.choice(self.lengths)
        task_seed = rng.randrange(self.seeds.start, self.seeds.stop)
        protocol = "inside" if kind != CONTINUATION and rng.random() < self.inside_share else "after"
        return kind, length, task_seed, protocol

    def example(self, tokenizer, index: int) -> Example:
        kind, length, task_seed, protocol = self.spec(index)
        return make_example(tokenizer, kind, length, task_seed, protocol)
