"""Locally generated text for the tasks: word lists, haystack sentences, pseudo-words.

Nothing here is downloaded. Every generator takes a ``random.Random`` so a task's text is a
pure function of its seed.
"""

from __future__ import annotations

import random

#: RULER's "noise" haystack (niah_single_1 and variable tracking): one repeated paragraph.
NOISE_PARAGRAPH = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

ADJECTIVES = tuple(
    """
    quiet bright ancient narrow gentle rapid silver golden wooden broken hidden lonely
    careful clever curious distant eager famous fragile frozen grand hollow humble honest
    little lively loyal modest noble odd patient plain polite proud rare rough round rusty
    sharp shiny silent simple sleepy smooth soft solid steady strange sturdy sudden sweet
    swift tall tender tiny warm wild wise young bold calm crisp dusty early empty faint
    fierce fresh gloomy hasty heavy jolly keen late light mild misty muddy neat pale
    """.split()
)

NOUNS = tuple(
    """
    river mountain garden window basket lantern castle bridge forest harbor valley meadow
    island candle mirror pencil kettle ladder blanket bottle button carpet cottage desert
    engine feather fountain hammer helmet jacket kitchen library market needle orchard
    palace parrot pillow planet pocket puzzle rabbit ribbon rocket saddle school shadow
    shelf shovel signal spoon stable station statue string sugar table teapot ticket
    tiger tower tunnel umbrella village violin wagon wallet whistle wizard anchor arrow
    badge barrel beacon boulder cabin canyon cellar chimney clock compass crystal dragon
    falcon fence glacier hawk lighthouse marble monkey notebook ocean owl pebble piano
    pirate quarry raven sail scarf shell spider storm sword temple thunder trumpet turtle
    volcano wheel
    """.split()
)

VERBS_PAST = tuple(
    """
    carried painted followed watched visited cleaned fixed opened closed pushed pulled
    lifted dropped found lost built moved counted measured borrowed returned described
    admired ignored noticed reached crossed guarded touched washed polished repaired
    """.split()
)

FIRST_NAMES = tuple(
    """
    Alice Bruno Clara Daniel Elena Felix Greta Hugo Irene Jonas Karin Louis Maria Nikolai
    Olivia Pablo Quinn Rosa Samuel Tessa Umar Vera Walter Xenia Yusuf Zara Adrian Bianca
    Conrad Dalia Emil Fiona Gustav Helena Ivan Julia Kurt Lena Marco Nadia Oscar Petra
    Rafael Selma Tobias Ursula Victor Wanda
    """.split()
)

LAST_NAMES = tuple(
    """
    Abbott Brennan Castell Dorsey Ellison Fairbanks Garrow Holloway Ingram Jarvis Kessler
    Lindqvist Marlowe Norcross Osborne Pemberton Quill Radcliffe Sterling Thorne Underhill
    Vance Whitlock Yardley Zeller Ashby Blackwood Crane Dunmore Everett Fenwick Grayson
    Hartley Iverson Kingsley Lockwood Merriweather Nash Oakley Prescott
    """.split()
)

CITIES = tuple(
    """
    Lisbon Oslo Nairobi Lima Dublin Vienna Prague Cairo Havana Quito Manila Seoul Hanoi
    Athens Warsaw Helsinki Madrid Santiago Bogota Ottawa Sydney Toronto Chicago Denver
    Boston Seattle Munich Milan Naples Geneva Zurich Lyon Porto Krakow Riga Tallinn
    Reykjavik Casablanca Istanbul Mumbai Bangkok Jakarta Osaka Kyoto Auckland Montreal
    """.split()
)

JOBS = tuple(
    """
    baker carpenter pilot nurse painter chemist librarian gardener sailor tailor teacher
    architect dentist farmer jeweler lawyer musician photographer plumber surgeon
    translator veterinarian writer astronomer blacksmith
    """.split()
)

COLORS = tuple("red blue green yellow purple orange black white brown pink gray violet".split())

#: Words for the common-words task, from all lists above (lower case, unique, ordered).
COMMON_WORD_POOL = tuple(
    dict.fromkeys(w.lower() for w in ADJECTIVES + NOUNS + VERBS_PAST + JOBS + COLORS)
)

_ONSETS = "b c d f g h j k l m n p r s t v z br dr fl gr kr pl st tr".split()
_VOWELS = "a e i o u".split()


def with_article(noun_phrase: str) -> str:
    """``"a tiger"``, ``"an early tiger"``."""
    return ("an " if noun_phrase[:1].lower() in "aeiou" else "a ") + noun_phrase


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up lower-case word such as ``"bravoki"``."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def distinct_pseudo_words(rng: random.Random, n: int, syllables: int = 3, avoid=()) -> list[str]:
    """``n`` distinct pseudo-words, none in ``avoid``."""
    seen = set(avoid)
    out: list[str] = []
    while len(out) < n:
        word = pseudo_word(rng, syllables)
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def essay_sentence(rng: random.Random) -> str:
    """One plain generated sentence for an essay-like haystack."""
    a, b = rng.sample(NOUNS, 2)
    name = rng.choice(FIRST_NAMES)
    form = rng.randrange(4)
    if form == 0:
        return f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS_PAST)} the {b} near the {rng.choice(NOUNS)}."
    if form == 1:
        return f"{name} {rng.choice(VERBS_PAST)} {with_article(rng.choice(ADJECTIVES) + ' ' + a)} in the {b}."
    if form == 2:
        return f"Every {a} in the {rng.choice(ADJECTIVES)} {b} was {rng.choice(ADJECTIVES)}."
    return f"Near the {a}, {name} {rng.choice(VERBS_PAST)} the {rng.choice(ADJECTIVES)} {b}."


def needle_key(rng: random.Random, avoid=()) -> str:
    """A needle key such as ``"quiet-river"`` (RULER's adjective-noun words), not in ``avoid``."""
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in avoid:
            return key


def magic_number(rng: random.Random, avoid=()) -> str:
    """A 7-digit number as text, not in ``avoid``."""
    while True:
        value = str(rng.randrange(1_000_000, 10_000_000))
        if value not in avoid:
            return value


def person_name(rng: random.Random, avoid=()) -> str:
    while True:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if name not in avoid:
            return name
