"""Generated RULER-style tasks: determinism, lengths, answers, protocols, with the real tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from vllm_kvevict.evaluation.tasks import KINDS, Task, make_suite, make_task


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _context_text(tokenizer, task: Task) -> str:
    return tokenizer.decode(task.context_ids)


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_seed_same_task_other_seed_other_task(tokenizer, kind):
    a = make_task(kind, tokenizer, 1024, seed=3)
    b = make_task(kind, tokenizer, 1024, seed=3)
    c = make_task(kind, tokenizer, 1024, seed=4)
    assert (a.prompt, a.prompt_ids, a.answers) == (b.prompt, b.prompt_ids, b.answers)
    assert a.prompt != c.prompt


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("length", [1024, 2048])
def test_prompt_length_is_close_below_target(tokenizer, kind, length):
    task = make_task(kind, tokenizer, length, seed=1)
    assert 0.97 * length <= len(task.prompt_ids) <= length
    assert task.context_tokens == length


def test_long_prompt_any_length(tokenizer):
    task = make_task("niah_multikey", tokenizer, 4000, seed=0)
    assert 0.97 * 4000 <= len(task.prompt_ids) <= 4000


@pytest.mark.parametrize("kind", list(KINDS))
def test_ids_are_the_prompt_and_answers_sit_in_the_context(tokenizer, kind):
    task = make_task(kind, tokenizer, 1024, seed=2)
    assert task.prompt_ids == tokenizer(task.prompt, add_special_tokens=False)["input_ids"]
    assert task.context_ids + task.question_ids == task.prompt_ids
    assert task.answer_prefix and task.prompt.endswith("<|im_start|>assistant\n" + task.answer_prefix)
    context = _context_text(tokenizer, task)
    question = tokenizer.decode(task.question_ids)
    assert task.answers
    for answer in task.answers:
        assert answer in context
        assert answer not in question  # the question must not give the answer away
    assert task.question in question and task.question not in context


@pytest.mark.parametrize("kind", ["niah_single", "qa", "cwe"])
def test_question_both_puts_question_inside_the_context(tokenizer, kind):
    task = make_task(kind, tokenizer, 1024, seed=2, question_position="both")
    context = _context_text(tokenizer, task)
    assert context.index(task.question) < context.index("\n\n")  # stated before the context
    assert tokenizer.decode(task.question_ids).endswith("assistant\n" + task.answer_prefix)
    assert len(task.prompt_ids) <= 1024


def test_without_answer_prefix_the_prompt_ends_with_the_generation_prompt(tokenizer):
    task = make_task("niah_single", tokenizer, 1024, seed=0, answer_prefix=False)
    assert task.prompt.endswith("<|im_start|>assistant\n") and task.answer_prefix == ""
    assert len(task.prompt_ids) <= 1024


def test_niah_needle_format(tokenizer):
    task = make_task("niah_single", tokenizer, 1024, seed=5)
    (value,) = task.answers
    match = re.search(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.", task.prompt)
    assert match and match.group(2) == value
    assert f"What is the special magic number for {match.group(1)}" in task.question


def test_multi_needle_answers(tokenizer):
    multivalue = make_task("niah_multivalue", tokenizer, 1024, seed=0)
    multiquery = make_task("niah_multiquery", tokenizer, 1024, seed=0)
    multikey = make_task("niah_multikey", tokenizer, 1024, seed=0)
    assert len(set(multivalue.answers)) == 4 and len(set(multiquery.answers)) == 4
    assert len(multikey.answers) == 1
    # multikey: four needles in the text, one asked.
    assert len(re.findall(r"special magic number for [a-z]+-[a-z]+ is: \d{7}", multikey.prompt)) == 4


def test_variable_chain_resolves_to_the_answers(tokenizer):
    task = make_task("vt", tokenizer, 2048, seed=7)
    assigns = dict(re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d{5})\.", task.prompt))
    value = re.search(r"assigned the value (\d{5})", task.question).group(1)

    def resolve(name: str) -> str:
        while name in assigns:
            name = assigns[name]
        return name

    assert sorted(n for n in assigns if resolve(n) == value) == sorted(task.answers)


def test_common_words_are_the_most_common(tokenizer):
    task = make_task("cwe", tokenizer, 2048, seed=1)
    words = re.findall(r"^\d+\. (\S+)$", _context_text(tokenizer, task), flags=re.M)
    counts = Counter(words).most_common()
    top = {w for w, _ in counts[: len(task.answers)]}
    assert top == set(task.answers)
    assert counts[len(task.answers) - 1][1] > counts[len(task.answers)][1]


def test_frequent_words_are_the_top_three(tokenizer):
    task = make_task("fwe", tokenizer, 2048, seed=1)
    body = _context_text(tokenizer, task).split("\n\n")[-1]
    counts = Counter(body.split()).most_common()
    assert [w for w, _ in counts[:3]] == task.answers
    assert counts[2][1] > counts[3][1]


def test_make_suite_order_and_prefix_stability(tokenizer):
    kinds = ["niah_single", "qa"]
    small = make_suite(kinds, tokenizer, [1024, 2048], n_per=2, seed=9)
    larger = make_suite(kinds, tokenizer, [1024], n_per=3, seed=9)
    assert [(t.context_tokens, t.kind) for t in small] == [
        (1024, "niah_single"), (1024, "niah_single"), (1024, "qa"), (1024, "qa"),
        (2048, "niah_single"), (2048, "niah_single"), (2048, "qa"), (2048, "qa"),
    ]
    assert len({t.uid for t in small}) == len(small)
    assert small[0].prompt == larger[0].prompt and small[1].prompt == larger[1].prompt


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="unknown task kind"):
        make_task("nope", tokenizer, 1024, 0)
    with pytest.raises(ValueError, match="question_position"):
        make_task("qa", tokenizer, 1024, 0, question_position="before")
    with pytest.raises(ValueError, match="cannot hold"):
        make_task("qa", tokenizer, 50, 0)
