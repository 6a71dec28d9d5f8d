"""Self-recall: a question about what the model itself wrote early in a long output.

A seeded prompt asks for a long numbered list of made-up people, ``N. First Last, job, city``;
the assistant's reply starts with one seeded line (``1. Anna Berg, baker, Lyon\\n2.``) so that
every seed sends the model down a different list. The model writes the rest greedily (the long
output, decode-time eviction at work). Then a follow-up turn is run as forced tokens on the same
cache (the assistant turn closed, a user turn asking e.g. "In your list, what is the job of Ben
Brumm?", and an answer prefix "In my list, the job of Ben Brumm is"), and the answer is decoded.
It is right when its first line holds what the model wrote for that person (case-insensitive, on
word boundaries, :func:`~vllm_kvevict.evaluation.scoring.answer_found`).

The question is parsed from the run's own output (:func:`choose_question`): a person written
by the model (item 2 on, among the first :data:`EARLY_ITEMS`) whose name and asked value (job or
city) appear in no other item, from a seeded item number on. A run whose output has no such
item has no question (:func:`choose_question` returns ``None``).

What a 135M model does (benchmarks/quality/SELF_RECALL.md): it writes 2-5 distinct people, then
loops on one line ("Kyle Benson, chef, Tokyo") to the end; its jobs and cities come from a small
set, so an answer can be right by guessing: :func:`prior_messages` is the same question with no
list before it, the guess rate to read beside the accuracies.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

from vllm_kvevict.evaluation.scoring import answer_found

FIRST_NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Karen",
               "Leo", "Maria", "Nina", "Owen", "Paula", "Ruth", "Simon", "Tara", "Victor", "Wendy", "Yusuf")
LAST_NAMES = ("Berg", "Castro", "Dalton", "Evans", "Fischer", "Garcia", "Holt", "Ito", "Jensen", "Klein",
              "Lopez", "Moreau", "Novak", "Okafor", "Price", "Quinn", "Rossi", "Silva", "Tanaka", "Weber")
JOBS = ("baker", "nurse", "teacher", "pilot", "farmer", "lawyer", "painter", "plumber", "dentist", "chef",
        "engineer", "librarian", "tailor", "mechanic", "florist", "architect")
CITIES = ("Lyon", "Oslo", "Lima", "Cairo", "Dublin", "Kyoto", "Porto", "Quebec", "Nairobi", "Seville",
          "Bergen", "Austin", "Krakow", "Hanoi", "Perth", "Zurich")
FIELDS = ("job", "city")
#: A question is about one of the first items (the model's own from item 2).
EARLY_ITEMS = 6
#: Item numbers the seeded question starts looking from.
FIRST_ASKED = (2, 3, 4)
#: Greedy tokens of the answer.
ANSWER_TOKENS = 12

_ITEM = re.compile(r"^\s*(\d+)\.\s*([^,\n]+?)\s*,\s*([^,\n]+?)\s*,\s*([^,\n]+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Item:
    """One parsed line ``number. name, job, city`` of the list."""

    number: int
    name: str
    job: str
    city: str


@dataclass(frozen=True)
class Question:
    """A question about one item: ``answer`` is what the model wrote in ``field``."""

    item: Item
    field: str
    question: str
    answer_prefix: str

    @property
    def answer(self) -> str:
        return getattr(self.item, self.field)


@dataclass(frozen=True)
class SelfRecallTask:
    """One seeded prompt.

    Attributes
    ----------
    seed : what made it (``random.Random(f"self-recall-{seed}")``).
    user : the user message.
    reply_start : the start of the assistant's reply (a seeded first item, then ``"2."``), part
        of the prompt.
    prompt_ids : chat template of ``user`` with the generation prompt, then ``reply_start``.
    max_new_tokens : tokens of the list the model writes.
    """

    seed: int
    user: str
    reply_start: str
    prompt_ids: list[int]
    max_new_tokens: int
    n_items: int

    @property
    def uid(self) -> str:
        return f"self-recall-{self.n_items}-{self.max_new_tokens}-{self.seed}"


def make_task(tokenizer, seed: int, n_items: int = 40, max_new_tokens: int = 384) -> SelfRecallTask:
    """The prompt of ``seed``: the same arguments always give the same task."""
    if n_items < EARLY_ITEMS:
        raise ValueError(f"n_items must be >= {EARLY_ITEMS} (the questions are about the first {EARLY_ITEMS}), got {n_items}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rng = random.Random(f"self-recall-{seed}")
    first = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}, {rng.choice(JOBS)}, {rng.choice(CITIES)}"
    user = f"Write a list of {n_items} made-up people, one per line, each with a job and a home city."
    reply_start = f"1. {first}\n2."
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True) + reply_start
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return SelfRecallTask(seed, user, reply_start, ids, max_new_tokens, n_items)


def parse_items(text: str) -> list[Item]:
    """Every line of ``text`` of the form ``number. name, job, city`` (a line cut short is not one)."""
    return [Item(int(m.group(1)), m.group(2).strip(), m.group(3).strip(), m.group(4).strip())
            for m in _ITEM.finditer(text)]


def choose_question(items: list[Item], seed: int) -> Optional[Question]:
    """The seeded question about ``items`` (the run's own parsed list), or ``None``.

    Candidates: (item, field) of items numbered 2 .. :data:`EARLY_ITEMS` (the model's own, early),
    at their first occurrence, whose name is in no other item and whose value of that field is in
    no other item (case-insensitive): the answer is nowhere else in the list, so the list's later
    lines (a 135M model loops on one line) cannot give it away. The seed picks a starting item
    number from :data:`FIRST_ASKED` and a preferred field; the first candidate from that number
    on is asked (the preferred field first), else the last one before it.
    """
    rng = random.Random(f"self-recall-question-{seed}")
    start, preferred = rng.choice(FIRST_ASKED), rng.choice(FIELDS)
    fields = (preferred,) + tuple(f for f in FIELDS if f != preferred)
    count = {f: [getattr(it, f).lower() for it in items] for f in ("name",) + FIELDS}
    seen: set[int] = set()
    candidates = []
    for it in items:
        if it.number in seen:
            continue
        seen.add(it.number)
        if not 2 <= it.number <= EARLY_ITEMS or count["name"].count(it.name.lower()) != 1:
            continue
        candidates += [(it, f) for f in fields if count[f].count(getattr(it, f).lower()) == 1]
    if not candidates:
        return None
    later = [c for c in candidates if c[0].number >= start]
    item, field = later[0] if later else candidates[-1]
    if field == "job":
        return Question(item, field, f"In your list, what is the job of {item.name}?",
                        f"In my list, the job of {item.name} is")
    return Question(item, field, f"In your list, what is the home city of {item.name}?",
                    f"In my list, the home city of {item.name} is")


def answer_line(text: str) -> str:
    """The part of an answer that is scored: up to its first line break."""
    return text.strip().split("\n", 1)[0]


def is_correct(question: Question, answer_text: str) -> bool:
    """Whether the answer's first line holds what the model wrote (word boundaries, any case)."""
    return answer_found(question.answer, answer_line(answer_text))


def _close_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message's content."""
    sentinel = "\x00REPLY\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": sentinel}],
                                         tokenize=False)
    return text[text.index(sentinel) + len(sentinel):]


def _user_turn(tokenizer) -> tuple[str, str]:
    """The template's text around a later user message (before, after incl. the generation prompt)."""
    sentinel = "\x00QUESTION\x00"
    base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    head = tokenizer.apply_chat_template(base, tokenize=False)
    full = tokenizer.apply_chat_template(base + [{"role": "user", "content": sentinel}], tokenize=False,
                                         add_generation_prompt=True)
    if not full.startswith(head):
        raise ValueError("the chat template re-renders earlier turns: a follow-up cannot be appended as tokens")
    turn = full[len(head):]
    cut = turn.index(sentinel)
    return turn[:cut], turn[cut + len(sentinel):]


def followup_ids(tokenizer, question: Question, ended_turn: bool) -> list[int]:
    """The forced tokens after the list: the assistant turn closed (unless the model ended it:
    ``ended_turn``, its end-of-turn token is the last one it chose), the question as a user turn,
    the generation prompt and the answer prefix."""
    close = _close_turn(tokenizer)
    eos = tokenizer.eos_token or ""
    if ended_turn and eos and close.startswith(eos):
        close = close[len(eos):]
    before, after = _user_turn(tokenizer)
    text = close + before + question.question + after + question.answer_prefix
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prior_messages(question: Question) -> list[dict]:
    """The question with no list before it (``continue_final_message``): the guess rate."""
    return [{"role": "user", "content": question.question}, {"role": "assistant", "content": question.answer_prefix}]
