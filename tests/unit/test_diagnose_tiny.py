"""The diagnostic on the tiny random Llama: fits match the engine's decode, decisions match the
engine's kept sets, swaps keep the contract, and one whole run holds together."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.evaluation.diagnose_run import diagnose_task
from vllm_kvevict.evaluation.diagnose import main as run_cli
from vllm_kvevict.evaluation.diagnose_decision import decide
from vllm_kvevict.evaluation.diagnose_evidence import evidence_spans
from vllm_kvevict.evaluation.diagnose_margin import answer_fit
from vllm_kvevict.evaluation.diagnose_slots import apply_swap, sample_swaps
from vllm_kvevict.evaluation.tasks import make_task
from vllm_kvevict.reference.selection import keep_all

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 16
CONFIGS = {
    "token": EvictionConfig(scorer="snapkv", budget=0.3, head_selection="token", min_tokens=0),
    "head_page": EvictionConfig(scorer="criticalkv", budget=0.3, head_selection="page", min_tokens=0),
    "page": EvictionConfig(scorer="keydiff", budget=0.3, granularity="page", min_tokens=0),
}


@pytest.fixture(scope="module")
def task(tiny_engine):
    return make_task("niah_single", tiny_engine.tokenizer, 400, seed=3)


@pytest.fixture(scope="module")
def prefilled(tiny_engine, task):
    return tiny_engine.prefill(task.prompt_ids)


@pytest.mark.parametrize("protocol", ["inside", "after"])
def test_fit_of_the_greedy_output_is_the_engines_decode(tiny_engine, task, prefilled, protocol):
    """Teacher-forcing the engine's own greedy tokens: every argmax right, and the log-likelihood
    is the sum of the engine's log-softmax at those tokens (same cache, positions, first logits)."""
    config = CONFIGS["token"]
    base = prefilled if protocol == "inside" else prefilled.prefix(task.context_end)
    suffix = torch.empty(0, dtype=torch.long) if protocol == "inside" else torch.tensor(task.question_ids)
    gen = tiny_engine.generate(base, config, 6, stop_on_eos=False, suffix_ids=suffix if suffix.numel() else None,
                               block_size=BLOCK, return_logits=True)
    target = torch.tensor(gen.token_ids)
    fit = answer_fit(tiny_engine.parts, base, gen.kept, suffix, target)
    expected = torch.log_softmax(gen.logits.double(), -1).gather(-1, target.view(-1, 1)).sum()
    assert fit.greedy
    assert fit.loglik == pytest.approx(float(expected), abs=1e-3)
    other = answer_fit(tiny_engine.parts, base, gen.kept, suffix, torch.roll(target, 1))
    assert other.loglik < fit.loglik


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_decision_keeps_what_the_engine_keeps(tiny_engine, prefilled, kind):
    config = CONFIGS[kind]
    decision = decide(prefilled, config, BLOCK)
    assert decision.slot_kind == kind
    expected = tiny_engine.kept_indices(prefilled, config, BLOCK)
    assert all(torch.equal(a, b) for ra, rb in zip(decision.kept, expected) for a, b in zip(ra, rb))
    for unit in decision.units:
        held = decision.kept[unit.layer or 0][unit.head or 0]
        for slot in range(unit.kept.numel()):
            inside = torch.isin(unit.tokens(slot, prefilled.prompt_len), held).all()
            assert bool(inside) == bool(unit.kept[slot])
        assert bool(unit.kept[unit.protected].all())


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_swap_keeps_each_heads_count_and_its_protected_tokens(tiny_engine, prefilled, kind):
    decision = decide(prefilled, CONFIGS[kind], BLOCK)
    L = prefilled.prompt_len
    swaps = sample_swaps(decision.units, 2, 3, seed=1)
    assert swaps
    for swap in swaps:
        new = apply_swap(decision.kept, decision.units, swap, L)
        for l, row in enumerate(new):
            for h, idx in enumerate(row):
                assert idx.numel() == decision.kept[l][h].numel()
                assert bool(torch.isin(torch.nonzero(decision.protected[l][h]).flatten(), idx).all())


def test_a_whole_run_reports_modes_margins_and_its_cost(tiny_engine, task, prefilled):
    config = CONFIGS["token"]
    spans = evidence_spans(task, tiny_engine.tokenizer)
    assert spans and all(tiny_engine.tokenizer.decode(task.prompt_ids[s.start:s.end]).strip() == s.answer for s in spans)
    run = diagnose_task(tiny_engine, task, config, prefilled=prefilled, block_size=BLOCK, m=2, units=3, seed=0)
    assert len(run["swaps"]) == 12
    repairs = sum(g is not None for g in run["gains"].values())
    assert run["forwards"] == 2 + repairs + 12
    assert sum(run["statuses"].values()) == prefilled.num_layers * prefilled.num_kv_heads * len(spans)
    assert run["gap"] == pytest.approx(run["loglik_full"] - run["loglik_base"])
    full = answer_fit(tiny_engine.parts, prefilled, keep_all(prefilled), torch.empty(0, dtype=torch.long),
                      torch.tensor(tiny_engine.tokenizer(" " + task.answers[0], add_special_tokens=False)["input_ids"]))
    assert run["loglik_full"] == pytest.approx(full.loglik)
    assert run["dominant"] in ("none", "outside_evidence", "support", "ranking", "projection")


def test_cli_refuses_bad_flags_naming_them(capsys):
    with pytest.raises(SystemExit):
        run_cli(["--scorer", "snapkv", "--budget", "0.1", "--m", "0"])
    assert "--m and --units" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["--scorer", "snapkv", "--budget", "1"])
    assert "--budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["--scorer", "nosuch", "--budget", "0.1"])
    assert "scorer" in capsys.readouterr().err
