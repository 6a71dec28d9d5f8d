"""The self-recall task: prompts, parsing the model's list, the question chosen, scoring."""

from __future__ import annotations

import pytest

from vllm_kvevict.evaluation.self_recall import (
    EARLY_ITEMS, GIVEN, Item, Question, answer_line, choose_question, followup_ids, is_correct, make_task, parse_items,
    prior_messages)

LIST = """1. Anna Berg, baker, Lyon
2. Ben Brumm, chef, Paris
3. Elena Elena, artist, Rome
4. Nana Nana, actress, Tokyo
5. Gina Gina, actress, New York
6. Ida Ida, pilot, Tokyo
7. Nana Nana, actress, Tokyo
8. Nana Na"""


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_tasks_are_seeded_and_differ(tokenizer):
    a, b = make_task(tokenizer, 7), make_task(tokenizer, 7)
    assert a == b
    assert len({make_task(tokenizer, s).user for s in range(8)}) == 8
    people = a.user.split("\n\n")[0].split("\n")[1:]
    given = parse_items("\n".join(f"{i}. {p}" for i, p in enumerate(people, 1)))
    assert len(given) == GIVEN
    for field in ("name", "job", "city"):
        assert len({getattr(it, field) for it in given}) == GIVEN  # distinct names, jobs, cities
    assert a.reply_start == "1." and tokenizer.decode(a.prompt_ids).endswith("<|im_start|>assistant\n1.")
    assert 80 < len(a.prompt_ids) < 300
    with pytest.raises(ValueError, match="given"):
        make_task(tokenizer, 0, given=3)
    with pytest.raises(ValueError, match="n_items"):
        make_task(tokenizer, 0, n_items=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_task(tokenizer, 0, max_new_tokens=0)


def test_parse_items_reads_whole_lines_only():
    items = parse_items(LIST)
    assert [it.number for it in items] == [1, 2, 3, 4, 5, 6, 7]  # the cut line 8 is not an item
    assert items[1] == Item(2, "Ben Brumm", "chef", "Paris")
    assert items[4].city == "New York"
    assert parse_items("no list here\n1. only, two") == []


def test_question_is_about_an_early_item_whose_name_and_line_are_unique():
    items = parse_items(LIST)
    asked = {choose_question(items, seed).item.number for seed in range(80)}
    # item 1 was forced, not the model's; item 4's name repeats at 7; the seed starts at 2, 3 or 4
    assert asked <= {2, 3, 5} and len(asked) >= 2
    repeated = parse_items(LIST.replace("5. Gina Gina, actress, New York", "5. Gina Gina, actress, Tokyo"))
    assert {choose_question(repeated, s).item.number for s in range(80)} <= {2, 3, 6}  # "actress, Tokyo" repeats
    assert choose_question(items, 3) == choose_question(items, 3)
    late = [Item(n, f"P{n}", f"job{n}", f"city{n}") for n in range(1, 20)]
    assert all(choose_question(late, s).item.number <= EARLY_ITEMS for s in range(30))
    same = [Item(1, "A B", "chef", "Oslo"), Item(2, "C D", "chef", "Oslo"), Item(3, "E F", "chef", "Oslo")]
    assert choose_question(same, 0) is None  # every answer is in another item too
    assert choose_question([Item(1, "A B", "chef", "Oslo"), Item(9, "C D", "nurse", "Lima")], 0) is None
    assert choose_question([], 0) is None


def test_question_asks_for_the_rest_of_the_line():
    q = choose_question(parse_items(LIST), 5)
    assert q.item.name in q.question
    assert q.answer_prefix == f"{q.item.number}. {q.item.name},"
    assert q.answer == f"{q.item.job}, {q.item.city}"
    assert prior_messages(q)[-1] == {"role": "assistant", "content": q.answer_prefix}


def test_scoring_reads_the_first_line_on_word_boundaries():
    q = Question(Item(2, "Ben Brumm", "chef", "New York"), "?", "2. Ben Brumm,")
    assert is_correct(q, " chef, New York")
    assert is_correct(q, " Chef, new york\n3. Ana")
    assert not is_correct(q, " chef, Tokyo\nchef, New York")  # only the first line counts
    assert not is_correct(q, " chef, New Yorkshire")
    assert answer_line("\n  a chef\nmore") == "a chef"


def test_followup_tokens_close_the_turn_and_ask(tokenizer):
    q = choose_question(parse_items(LIST), 1)
    eos = tokenizer.eos_token_id
    cut = followup_ids(tokenizer, q, ended_turn=False)
    ended = followup_ids(tokenizer, q, ended_turn=True)
    assert cut[0] == eos and cut[1:] == ended and ended[0] != eos
    text = tokenizer.decode(cut)
    assert text.startswith("<|im_end|>\n<|im_start|>user\n" + q.question + "<|im_end|>\n<|im_start|>assistant\n")
    assert text.endswith(q.answer_prefix)
    # the same tokens as the chat template of the whole conversation would give
    task = make_task(tokenizer, 1)
    reply = task.reply_start + " Ben Brumm, chef, Paris"
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": task.user}, {"role": "assistant", "content": reply},
         {"role": "user", "content": q.question}], tokenize=False, add_generation_prompt=True) + q.answer_prefix
    listed = task.prompt_ids + tokenizer(" Ben Brumm, chef, Paris", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(listed + cut) == whole


def _row(uid, policy, budget, score, question="q?"):
    return dict(uid=uid, policy=policy, budget=budget, min_tokens=0, decode_interval=0 if policy == "none" else 64,
                allocation="none", granularity="page", question=question, score=score, generated_tokens=100,
                items=10, wall_s=1.0, held_at_question=50)


def test_report_counts_only_prompts_stock_could_ask(tmp_path):
    from benchmarks.quality.self_recall_report import bootstrap, summarize, update_summary

    short = dict(_row("d", "none", 1.0, 1.0), generated_tokens=40)  # ended before the first interval
    rows = [_row("a", "none", 1.0, 1.0), _row("b", "none", 1.0, 0.0), _row("c", "none", 1.0, 0.0, question=None),
            short, _row("d", "snapkv", 128.0, 1.0),
            _row("a", "snapkv", 128.0, 0.0), _row("b", "snapkv", 128.0, 0.0), _row("c", "snapkv", 128.0, 1.0)]
    summary, info = summarize(rows)
    assert info == {"prompts": 4, "with_question": 3, "evicted_before_question": 2}
    stock, snap = summary
    assert (stock["policy"], stock["n"], stock["accuracy"], stock["retention"]) == ("none", 2, 0.5, 1.0)
    assert (snap["n"], snap["accuracy"], snap["retention"], snap["diff_vs_stock"]) == (2, 0.0, 0.0, -0.5)
    assert snap["protocol"] == "self-recall" and snap["budget"] == 128.0
    assert bootstrap([1.0] * 5) == (1.0, 1.0)
    low, high = bootstrap([0.0, 1.0] * 10)
    assert 0.2 < low < 0.5 < high < 0.8
    path = tmp_path / "summary.json"
    path.write_text('[{"run": "reference", "n": 3}, {"run": "self-recall", "n": 1}]')
    update_summary(summary, path)
    import json

    kept = json.loads(path.read_text())
    assert kept[0] == {"run": "reference", "n": 3} and len(kept) == 3
    assert set(kept[1]) == {"run", "engine", "policy", "allocation", "granularity", "budget", "min_tokens",
                            "protocol", "task", "context_tokens", "n", "accuracy", "ci_low", "ci_high", "retention"}
