"""The task kinds: each builds a :class:`Draft` whose context can be grown to any length.

A draft fixes everything random about one task (keys, values, depths, the filler stream) from
its ``random.Random``; ``render(n)`` then lays out the context with ``n`` filler units, so
:func:`vllm_kvevict.evaluation.tasks.make_task` can search ``n`` until the prompt has the
requested number of tokens. Formats follow RULER (Hsieh et al., 2024), kept simple enough for
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

from vllm_kvevict.evaluation import text


@dataclass
class Draft:
    """One task before its length is fixed.

    Attributes
    ----------
    header : instructions placed before the context (part of the compressed prompt).
    question : the question and answer instructions, placed after the context.
    render : ``n -> (context, answers)``; the context grows with ``n`` (filler units).
    max_new_tokens : decode budget large enough for a correct answer after ``answer_prefix``.
    answer_prefix : RULER's start of the answer, put after the generation prompt so that the
        model answers at once (shorter decodes); ``make_task(..., answer_prefix=False)`` drops it.
    followups : other questions on the same context, each ``(question, answer_prefix, answers)``
        (a conversation's later turns, :mod:`vllm_kvevict.evaluation.followup`); drawn after
        everything else, so they change no task.
    """

    header: str
    question: str
    render: Callable[[int], tuple[str, list[str]]]
    max_new_tokens: int
    answer_prefix: str = ""
    followups: tuple[tuple[str, str, list[str]], ...] = ()


class _Stream:
    """An endless seeded sequence, materialised on demand: ``stream[:n]`` is stable in ``n``."""

    def __init__(self, rng: random.Random, make: Callable[[random.Random, int], str]):
        self._rng, self._make, self._items = rng, make, []

    def take(self, n: int) -> list[str]:
        while len(self._items) < n:
            self._items.append(self._make(self._rng, len(self._items)))
        return self._items[:n]


def _noise_stream(rng: random.Random) -> _Stream:
    sentences = [s.strip() + "." for s in text.NOISE_PARAGRAPH.split(".") if s.strip()]
    return _Stream(rng, lambda _r, i: sentences[i % len(sentences)])


def _essay_stream(rng: random.Random) -> _Stream:
    return _Stream(rng, lambda r, _i: text.essay_sentence(r))


def _insert(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Put each needle before the unit at ``int(depth * len(units))`` (stable for equal depths)."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda p: p[1], reverse=True):
        out.insert(int(round(depth * len(units))), needle)
    return out


def _depths(rng: random.Random, k: int) -> list[float]:
    """``k`` needle depths in [0.05, 0.95], sorted (document order)."""
    return sorted(rng.uniform(0.05, 0.95) for _ in range(k))


# --------------------------------------------------------------------------- needle tasks
_NIAH_HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards."
)


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is: {value}."


def _niah(rng: random.Random, *, n_keys: int, n_values: int, n_queries: int, noise: bool) -> Draft:
    """General needle in a haystack: ``n_keys`` keys (the first ``n_queries`` are asked),
    ``n_values`` values per key."""
    keys: list[str] = []
    for _ in range(n_keys):
        keys.append(text.needle_key(rng, avoid=keys))
    values: dict[str, list[str]] = {}
    used: set[str] = set()
    for key in keys:
        values[key] = []
        for _ in range(n_values):
            v = text.magic_number(rng, avoid=used)
            used.add(v)
            values[key].append(v)
    if n_values == 1:
        needles = [_needle(k, values[k][0]) for k in keys]
    else:
        needles = [f"One of the special magic numbers for {k} is: {v}." for k in keys for v in values[k]]
    order = list(range(len(needles)))
    rng.shuffle(order)
    needles = [needles[i] for i in order]
    depths = _depths(rng, len(needles))
    asked = keys[:n_queries]
    answers = [v for k in asked for v in values[k]]
    filler = _noise_stream(rng) if noise else _essay_stream(rng)

    if n_values > 1:
        question = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic numbers for {asked[0]} mentioned in the provided text are"
    elif n_queries > 1:
        named = f"{', '.join(asked[:-1])} and {asked[-1]}"
        question = f"What are the special magic numbers for {named} mentioned in the provided text?"
        prefix = f"The special magic numbers for {named} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {asked[0]} mentioned in the provided text is"
    question += " Answer with the number" + ("s" if len(answers) > 1 else "") + " only."
    followups = ()
    if n_values == 1 and n_queries == 1:  # one key asked: the other keys are the follow-ups
        followups = tuple((f"What is the special magic number for {k} mentioned in the provided text? Answer with "
                           "the number only.", f"The special magic number for {k} mentioned in the provided text is",
                           [values[k][0]]) for k in keys[1:])

    def render(n: int) -> tuple[str, list[str]]:
        return " ".join(_insert(filler.take(n), needles, depths)), answers

    return Draft(_NIAH_HEADER, question, render, max_new_tokens=8 + 10 * len(answers), answer_prefix=prefix,
                 followups=followups)


def niah_single(rng: random.Random) -> Draft:
    return _niah(rng, n_keys=1, n_values=1, n_queries=1, noise=True)


def niah_multikey(rng: random.Random) -> Draft:
    return _niah(rng, n_keys=4, n_values=1, n_queries=1, noise=False)


def niah_multivalue(rng: random.Random) -> Draft:
    return _niah(rng, n_keys=1, n_values=4, n_queries=1, noise=False)


def niah_multiquery(rng: random.Random) -> Draft:
    return _niah(rng, n_keys=4, n_values=1, n_queries=4, noise=False)


def niah_twokey(rng: random.Random) -> Draft:
    """Two single-value needles in noise (``niah_single``'s haystack): the first key is asked,
    the second is the follow-up. Not in :data:`KINDS` (the conversation check's kind)."""
    return _niah(rng, n_keys=2, n_values=1, n_queries=1, noise=True)


# --------------------------------------------------------------------------- variable tracking
def variable_tracking(rng: random.Random, hops: int = 4) -> Draft:
    """RULER's ``vt``: ``VAR A = 12345``, ``VAR B = VAR A``, ... in a noise haystack."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names and name != "VAR":
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    depths = _depths(rng, len(needles))
    filler = _noise_stream(rng)
    question = (
        f"Find all variables that are assigned the value {value} in the text above, directly or "
        "through other variables. Answer with the variable names only."
    )

    def render(n: int) -> tuple[str, list[str]]:
        return " ".join(_insert(filler.take(n), needles, depths)), list(names)

    header = "Memorize and track the chain of variable assignments hidden in the following text."
    prefix = (
        f"According to the chain of variable assignments in the text above, {len(names)} variables "
        f"are assigned the value {value}, they are:"
    )
    return Draft(header, question, render, max_new_tokens=40, answer_prefix=prefix)


# --------------------------------------------------------------------------- word extraction
def common_words(rng: random.Random, n_common: int = 5) -> Draft:
    """RULER's ``cwe``: a numbered word list where ``n_common`` words repeat far more often.

    ``n`` uncommon words appear twice each; each common word appears ``max(8, n // 20)`` times.
    """
    pool = list(text.COMMON_WORD_POOL)
    rng.shuffle(pool)
    common, rest = pool[:n_common], pool[n_common:]
    overflow = _Stream(random.Random(rng.random()), lambda r, _i: text.pseudo_word(r, 2))
    order_seed = rng.random()

    def render(n: int) -> tuple[str, list[str]]:
        uncommon = rest[:n] + [w for w in overflow.take(max(0, n - len(rest))) if w not in pool]
        freq = max(8, n // 20)
        words = common * freq + uncommon * 2
        random.Random(f"{order_seed}-{n}").shuffle(words)
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words)), list(common)

    header = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often."
    )
    question = (
        f"What are the {n_common} most common words in the above list? Answer with the words only."
    )
    prefix = f"Answer: The top {n_common} words that appear most often in the list are:"
    return Draft(header, question, render, max_new_tokens=32, answer_prefix=prefix)


def frequent_words(rng: random.Random, vocab: int = 60, alpha: float = 2.0) -> Draft:
    """RULER's ``fwe``: coded words with Zipf counts; the answer is the three most frequent.

    Counts are exact Zipf shares of ``n`` words (not sampled), with the top three strictly
    ahead of the rest, so the answer is never a tie.
    """
    words = text.distinct_pseudo_words(rng, vocab, syllables=2)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
    total_w = sum(weights)
    order_seed = rng.random()

    def render(n: int) -> tuple[str, list[str]]:
        counts = [int(n * w / total_w) for w in weights]
        for r in (2, 1, 0):  # keep the top three strictly ordered above what follows
            counts[r] = max(counts[r], counts[r + 1] + 1)
        seq = [w for w, c in zip(words, counts) for _ in range(c)]
        random.Random(f"{order_seed}-{n}").shuffle(seq)
        return " ".join(seq), words[:3]

    header = (
        "Read the following coded text and track the frequency of each coded word. Find the "
        "three most frequently appeared coded words."
    )
    question = (
        "What are the three most frequently appeared words in the above coded text? Answer with "
        "the three words only."
    )
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return Draft(header, question, render, max_new_tokens=24, answer_prefix=prefix)


# --------------------------------------------------------------------------- question over a document
def document_qa(rng: random.Random, n_residents: int = 4) -> Draft:
    """A question about one of ``n_residents`` people described in a generated essay.

    Each resident gets one fact sentence (job and city) at a seeded depth; the question asks the
    city or the job of one of them.
    """
    names: list[str] = []
    facts: list[str] = []
    cities: list[str] = []
    for _ in range(n_residents):
        names.append(text.person_name(rng, avoid=names))
        job, city = rng.choice(text.JOBS), rng.choice(text.CITIES)
        cities.append(city)
        facts.append(f"{names[-1]} works as {text.with_article(job)} and lives in {city}.")
        if len(facts) == 1:
            asks_city = rng.random() < 0.5
            answer = city if asks_city else job
    order = list(range(n_residents))
    rng.shuffle(order)
    needles = [facts[i] for i in order]
    depths = _depths(rng, n_residents)
    filler = _essay_stream(rng)
    target = names[0]
    question = f"In which city does {target} live?" if asks_city else f"What is the job of {target}?"
    instruction = (
        "Answer the question based on the given document. Only give me the answer and do not "
        "output any other words."
    )

    def render(n: int) -> tuple[str, list[str]]:
        return " ".join(_insert(filler.take(n), needles, depths)), [answer]

    header = f"{instruction}\n\nThe following is the given document."
    # follow-ups: the city of each other resident whose city differs from the first answer's
    followups = tuple((f"{instruction}\n\nQuestion: In which city does {name} live?", "Answer:", [city])
                      for name, city in zip(names[1:], cities[1:]) if city != answer)
    return Draft(header, f"{instruction}\n\nQuestion: {question}", render, max_new_tokens=16, answer_prefix="Answer:",
                 followups=followups)


#: Kind name -> draft builder. Names follow RULER's task names where one exists.
KINDS: dict[str, Callable[[random.Random], Draft]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": variable_tracking,
    "cwe": common_words,
    "fwe": frequent_words,
    "qa": document_qa,
}
