"""Two-turn conversations over one context: a first question, then a follow-up on the same context.

Turn 1 is a chat whose user message holds the instructions, the context and the first question
(what a served user sends: the question is inside the prompt the server evicts), and whose
assistant message starts with RULER's answer prefix (sent with ``continue_final_message``).
Turn 2 re-sends that conversation with the model's first reply, then asks the follow-up, a
question about another fact of the same context (:attr:`~vllm_kvevict.evaluation.kinds.Draft.
followups`), again with its answer prefix. Turn 1's prompt is a prefix of turn 2's, so a server
with prefix caching may read turn 1's prompt blocks for it.

Kinds: ``niah_twokey`` (two needles in ``niah_single``'s noise haystack, the second key is the
follow-up) and ``qa`` (the city of another resident of the document).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vllm_kvevict.evaluation.kinds import KINDS, Draft, niah_twokey

#: Conversation kinds -> draft builders (each draft has at least one follow-up).
FOLLOWUP_KINDS = {"niah_twokey": niah_twokey, "qa": KINDS["qa"]}


@dataclass(frozen=True)
class Conversation:
    """One two-turn conversation; ``context_tokens`` bounds turn 1's prompt (chat template
    included, answer prefix continued)."""

    kind: str
    seed: int
    context_tokens: int
    user: str
    question: str
    answer_prefix: str
    answers: list[str]
    followup: str
    followup_prefix: str
    followup_answers: list[str]
    max_new_tokens: int
    first_prompt_tokens: int

    @property
    def uid(self) -> str:
        return f"{self.kind}-{self.context_tokens}-followup-{self.seed}"

    def first_turn(self) -> list[dict]:
        return [{"role": "user", "content": self.user}, {"role": "assistant", "content": self.answer_prefix}]

    def followup_alone(self) -> list[dict]:
        """The follow-up asked as a first turn (the context, then the follow-up in place of the
        first question): what the follow-up scores without the conversation before it."""
        user = self.user[: len(self.user) - len(self.question)] + self.followup
        return [{"role": "user", "content": user}, {"role": "assistant", "content": self.followup_prefix}]

    def second_turn(self, first_reply: str) -> list[dict]:
        """The conversation re-sent with the model's first reply, then the follow-up."""
        return [{"role": "user", "content": self.user},
                {"role": "assistant", "content": self.answer_prefix + first_reply},
                {"role": "user", "content": self.followup},
                {"role": "assistant", "content": self.followup_prefix}]


def _user(draft: Draft, n: int) -> tuple[str, list[str]]:
    context, answers = draft.render(n)
    return f"{draft.header}\n\n{context}\n\n{draft.question}", answers


def _prompt_tokens(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, continue_final_message=True)
    return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def make_conversation(kind: str, tokenizer, context_tokens: int, seed: int) -> Conversation:
    """The conversation of ``kind`` whose first turn is at most (and close to) ``context_tokens``
    tokens under ``tokenizer``'s chat template (the model's own, as the server applies it)."""
    if kind not in FOLLOWUP_KINDS:
        raise ValueError(f"unknown conversation kind {kind!r}; known: {', '.join(FOLLOWUP_KINDS)}")
    draft = FOLLOWUP_KINDS[kind](random.Random(f"{kind}-followup-{seed}"))
    if not draft.followups:
        raise ValueError(f"{kind} seed {seed}: no follow-up question")

    def length(n: int) -> int:
        user, _ = _user(draft, n)
        return _prompt_tokens(tokenizer, [{"role": "user", "content": user},
                                          {"role": "assistant", "content": draft.answer_prefix}])

    if length(0) > context_tokens:
        raise ValueError(f"{kind}: {context_tokens} tokens cannot hold the conversation ({length(0)} without filler)")
    lo, hi = 0, 16
    while length(hi) <= context_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) <= context_tokens else (lo, mid)
    user, answers = _user(draft, lo)
    question, prefix, followup_answers = draft.followups[0]
    return Conversation(kind=kind, seed=seed, context_tokens=context_tokens, user=user, question=draft.question,
                        answer_prefix=draft.answer_prefix,
                        answers=list(answers), followup=question, followup_prefix=prefix,
                        followup_answers=list(followup_answers), max_new_tokens=draft.max_new_tokens,
                        first_prompt_tokens=length(lo))


def make_conversations(kinds, tokenizer, lengths, n_per: int, seed: int = 0) -> list[Conversation]:
    """``n_per`` conversations per kind x length (seeds ``seed * 100_003 + i``), skipping seeds
    whose draft has no follow-up (a ``qa`` document whose residents all share the first city)."""
    out = []
    for length in lengths:
        for kind in kinds:
            i = made = 0
            while made < n_per:
                try:
                    out.append(make_conversation(kind, tokenizer, length, seed * 100_003 + i))
                    made += 1
                except ValueError as exc:
                    if "no follow-up" not in str(exc):
                        raise
                i += 1
    return out
