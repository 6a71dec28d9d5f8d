"""Scoring of outputs and the statistics reported with them."""

from __future__ import annotations

import math
import re


def answer_found(answer: str, output_text: str) -> bool:
    """RULER's contains-match, case-insensitive, on word boundaries.

    The boundary check keeps ``"red"`` from matching inside ``"answered"`` and ``"1234567"``
    from matching inside a longer number; otherwise it is RULER's ``ref.lower() in pred.lower()``.
    """
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer.lower()) + r"(?![0-9A-Za-z])"
    return re.search(pattern, output_text.lower()) is not None


def score(task, output_text: str) -> float:
    """Fraction of ``task.answers`` found in ``output_text`` (RULER's ``string_match_all``)."""
    answers = task.answers
    return sum(answer_found(a, output_text) for a in answers) / len(answers)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (``successes`` may be fractional scores summed).

    Returns ``(low, high)``; ``(0.0, 1.0)`` when ``n == 0``.
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
