"""LKV training: the data stream (held-out kinds, disjoint seeds), the loss rows, and a whole run
on the tiny random Llama (artifact written, resumable to the same result)."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.lkv import train
from vllm_kvevict.lkv.artifact import load_artifact
from vllm_kvevict.lkv.data import (
    CONTINUATION,
    DEFAULT_HELD_OUT,
    TRAIN_SEEDS,
    VALIDATION_SEEDS,
    Stream,
    check_kinds,
    make_example,
)
from vllm_kvevict.lkv.prepare import counted_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_held_out_kinds_are_never_drawn_and_seeds_are_disjoint_from_the_benchmarks():
    args = train.parse_args(["--model", "m", "--out", "x.safetensors"])
    assert set(DEFAULT_HELD_OUT) == set(args.held_out) and not set(args.kinds) & set(args.held_out)
    assert CONTINUATION in args.kinds and len(args.held_out) >= 2
    stream = Stream(args.kinds, (1024,), 0.3, seed=0)
    specs = [stream.spec(i) for i in range(500)]
    assert {kind for kind, *_ in specs} == set(args.kinds)
    assert all(seed in TRAIN_SEEDS for _, _, seed, _ in specs)
    assert specs == [stream.spec(i) for i in range(500)], "example i depends on (seed, i) only"
    benchmark_seeds = {s * 100_003 + i for s in range(9) for i in range(100)}  # make_suite's
    assert not benchmark_seeds & set(TRAIN_SEEDS) and not benchmark_seeds & set(VALIDATION_SEEDS)
    assert not set(TRAIN_SEEDS) & set(VALIDATION_SEEDS)


def test_kind_lists_are_checked():
    with pytest.raises(ValueError, match="both trained on and held out: qa"):
        check_kinds(["qa", "vt"], ["qa"])
    with pytest.raises(ValueError, match="unknown kind 'bogus'"):
        check_kinds(["bogus"], [])
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "m", "--out", "x", "--kinds", "qa", "--held-out", "qa"])


def test_examples_compress_the_context_or_the_whole_prompt(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    after = make_example(tokenizer, "niah_single", 400, 1_000_001, "after")
    inside = make_example(tokenizer, "niah_single", 400, 1_000_001, "inside")
    assert inside.compressed_ids == after.compressed_ids + after.fed_ids and not inside.fed_ids
    text = make_example(tokenizer, CONTINUATION, 300, 7, "after")
    assert len(text.compressed_ids) == 300 and len(text.fed_ids) == 48 and text.max_new_tokens == 0


def test_counted_rows_weigh_the_answer_more_than_the_question():
    rows, weights = counted_rows(num_fed=6, num_answer=3, question_weight=0.25)
    # fed = q0 q1 q2 a0 a1 a2: rows 0..4 predict q1 q2 a0 a1 a2
    assert rows.tolist() == [0, 1, 2, 3, 4] and weights.tolist() == [0.25, 0.25, 1.0, 1.0, 1.0]


def _run(tmp_path, out, extra):
    argv = ["--model", str(out["model"]), "--out", str(tmp_path / out["name"]), "--cache", str(tmp_path / "cache"),
            "--log", str(tmp_path / f"log-{out['name']}"), "--examples", "2", "--validation-examples", "1",
            "--steps", "4", "--lengths", "300", "--validate-every", "2", "--checkpoint-every", "1",
            "--kinds", f"niah_single,{CONTINUATION}", "--held-out", "qa,niah_multivalue"] + extra
    train.main(argv)
    return load_artifact(tmp_path / out["name"])


def test_a_run_writes_the_artifact_and_a_resumed_run_ends_the_same(tmp_path, tiny_llama_dir):
    from vllm_kvevict.lkv.identity import ModelIdentity
    from transformers import AutoConfig

    whole = _run(tmp_path, {"model": tiny_llama_dir, "name": "whole.safetensors"}, [])
    assert whole.identity == ModelIdentity.from_hf_config(AutoConfig.from_pretrained(str(tiny_llama_dir)))
    assert whole.training["steps_done"] == 4
    assert (tmp_path / "log-whole.safetensors/training_curve.png").exists()
    assert (tmp_path / "log-whole.safetensors/head_budgets.png").exists()
    first = _run(tmp_path, {"model": tiny_llama_dir, "name": "split.safetensors"}, ["--stop-after", "2"])
    assert first.training["steps_done"] == 2
    resumed = _run(tmp_path, {"model": tiny_llama_dir, "name": "split.safetensors"}, [])
    assert resumed.training["steps_done"] == 4
    for a, b in zip(whole.scorer.state_dict().values(), resumed.scorer.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.shares.state_dict().values(), resumed.shares.state_dict().values()):
        assert torch.equal(a, b)
    trained = dict(whole.scorer.named_parameters())
    assert trained["w2"].abs().sum() > 0, "the scorer moved from its KeyDiff start"
    from transformers import AutoModelForCausalLM

    rotary = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).model.rotary_emb
    assert torch.allclose(whole.scorer.inv_freq, rotary.inv_freq.float()), "the model's RoPE, for de-rotation"


def test_init_starts_from_an_artifact_and_refuses_other_module_sizes(tmp_path, tiny_llama_dir):
    model = {"model": tiny_llama_dir}
    first = _run(tmp_path, {**model, "name": "first.safetensors"}, [])
    warm = _run(tmp_path, {**model, "name": "warm.safetensors"},
                ["--init", str(tmp_path / "first.safetensors"), "--steps", "4", "--stop-after", "0"])
    assert warm.training["steps_done"] == 0
    assert warm.training["init"]["training"]["steps_done"] == 4, "the new record names what it started from"
    for a, b in zip(first.scorer.state_dict().values(), warm.scorer.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(first.shares.state_dict().values(), warm.shares.state_dict().values()):
        assert torch.equal(a, b)
    cold = _run(tmp_path, {**model, "name": "cold.safetensors"}, ["--stop-after", "0"])
    assert not torch.equal(cold.scorer.state_dict()["w2"], warm.scorer.state_dict()["w2"])
    with pytest.raises(SystemExit, match="module sizes"):
        _run(tmp_path, {**model, "name": "other.safetensors"},
             ["--init", str(tmp_path / "first.safetensors"), "--rank", "4"])
