"""Self-recall: a question about what the model itself wrote early in a long output.

A seeded prompt asks for a long numbered list of made-up people, ``N. First Last, job, city``;
the assistant's reply starts with one seeded line (``1. Anna Berg, baker, Lyon\\n2.``) so that
every seed sends the model down a different list. The model writes the rest greedily (the long
output, decode-time eviction at work). Then a follow-up turn is run as forced tokens on the same
cache (the assistant turn closed, a user turn "Repeat the line of your list about Ben Brumm.",
and the answer prefix "2. Ben Brumm,": the start of that line), and the answer is decoded. It
is right when its first line holds the rest of the line the model wrote, ``chef, Paris``
(case-insensitive, on word boundaries, :func:`~vllm_kvevict.evaluation.scoring.answer_found`).
(A question in words, "what is the job of Ben Brumm?", was tried first: SmolLM2-135M answered
it from its last lines, wrong even at full cache.)

The question is parsed from the run's own output (:func:`choose_question`): a person written
by the model (item 2 on, among the first :data:`EARLY_ITEMS`) whose name and ``job, city``
appear in no other item, from a seeded item number on. A run whose output has no such item has
no question (:func:`choose_question` returns ``None``).

What a 135M model does (benchmarks/quality/SELF_RECALL.md): it writes 2-5 distinct people, then
loops on one line ("Kyle Benson, chef, Tokyo") to the end, and it recalls an early line only
over short outputs, even at full cache; :func:`prior_messages` is the same question with no list
before it, the guess rate to read beside the accuracies.
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
#: A question is about one of the first items (from item 2: the answer is not the first line).
EARLY_ITEMS = 6
#: People the prompt gives (the model copies them first, then makes up more).
GIVEN = 6
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
    """Asks for one item's line again: the answer prefix is the line's start (``"3. Ben Brumm,"``)
    and ``answer`` the rest the model wrote (``"chef, Paris"``)."""

    item: Item
    question: str
    answer_prefix: str

    @property
    def answer(self) -> str:
        return f"{self.item.job}, {self.item.city}"


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


def make_task(tokenizer, seed: int, n_items: int = 40, max_new_tokens: int = 256, given: int = GIVEN) -> SelfRecallTask:
    """The prompt of ``seed``: the same arguments always give the same task.

    The user message gives ``given`` seeded people (distinct names, jobs and cities) and asks
    for them as a numbered list, then more made-up ones to ``n_items``; the reply starts with
    ``"1."``. The model writes the list itself: its first lines are its copy of the given
    people (what a question asks about), the rest what it makes up.
    """
    if not EARLY_ITEMS <= given <= min(len(JOBS), len(CITIES), len(FIRST_NAMES)):
        raise ValueError(f"given must be between {EARLY_ITEMS} and {min(len(JOBS), len(CITIES))}, got {given}")
    if n_items < given:
        raise ValueError(f"n_items must be >= given ({given}), got {n_items}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rng = random.Random(f"self-recall-{seed}")
    people = [f"{f} {l}, {j}, {c}" for f, l, j, c in zip(rng.sample(FIRST_NAMES, given), rng.sample(LAST_NAMES, given),
                                                          rng.sample(JOBS, given), rng.sample(CITIES, given))]
    user = (f"Here are {given} people, each with a job and a home city:\n" + "\n".join(people) +
            f"\n\nWrite them as a numbered list, one per line, then go on with {n_items - given} more made-up "
            "people in the same form.")
    reply_start = "1."
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

    Candidates: items numbered 2 .. :data:`EARLY_ITEMS` (the model's own, early), at their first
    occurrence, whose name is in no other item and whose ``job, city`` is in no other item
    (case-insensitive): the answer is nowhere else in the list, so the list's later lines (a
    135M model loops on one line) cannot give it away. The seed picks a starting item number
    from :data:`FIRST_ASKED`; the first candidate from that number on is asked, else the last
    one before it.
    """
    start = random.Random(f"self-recall-question-{seed}").choice(FIRST_ASKED)
    names = [it.name.lower() for it in items]
    lines = [f"{it.job}, {it.city}".lower() for it in items]
    seen: set[int] = set()
    candidates = []
    for it, name, line in zip(items, names, lines):
        if it.number in seen:
            continue
        seen.add(it.number)
        if 2 <= it.number <= EARLY_ITEMS and names.count(name) == 1 and lines.count(line) == 1:
            candidates.append(it)
    if not candidates:
        return None
    later = [it for it in candidates if it.number >= start]
    item = later[0] if later else candidates[-1]
    return Question(item, f"Repeat the line of your list about {item.name}.", f"{item.number}. {item.name},")


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
