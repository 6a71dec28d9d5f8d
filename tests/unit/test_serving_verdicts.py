"""The serving check's VECTOR verdict parts (benchmarks/serving/verdicts.py): residuals judged as
the values are, and that decode attention took every key-only token in every decode step."""

from __future__ import annotations

import torch

from benchmarks.serving import verdicts
from vllm_kvevict.policies import LayerScores

# two layers, two KV heads: 4 key-only tokens in layer 0 (2 + 2), none in layer 1
KEY_ONLY = [[torch.tensor([3, 9]), torch.tensor([4, 5])], [torch.tensor([], dtype=torch.long)] * 2]


def test_key_only_attended_every_step_passes():
    reads = [("gpu", 0, 4)] * 15
    assert verdicts.key_only_attended(reads, KEY_ONLY, 15) == (True, {0: [4, 15], 1: [0, 0]})
    assert verdicts.key_only_attended([("torch", 0, 4)] * 16, KEY_ONLY, 15)[0]


def test_key_only_attended_fails_when_dropped_short_or_partial():
    assert not verdicts.key_only_attended([], KEY_ONLY, 15)[0]  # never taken: silently dropped
    assert not verdicts.key_only_attended([("gpu", 0, 4)] * 14, KEY_ONLY, 15)[0]  # a decode step without them
    assert not verdicts.key_only_attended([("gpu", 0, 4)] * 15 + [("gpu", 0, 2)], KEY_ONLY, 15)[0]  # some only
    assert not verdicts.key_only_attended([("gpu", 0, 4)] * 15 + [("gpu", 1, 2)], KEY_ONLY, 15)[0]  # another layer
    empty = [[torch.tensor([], dtype=torch.long)] * 2] * 2
    assert not verdicts.key_only_attended([], empty, 15)[0]  # no key-only token held: nothing checked


def _scores(values, residuals=None):
    protected = torch.zeros_like(values, dtype=torch.bool)
    protected[:, -1] = True
    return LayerScores(values=values, protected=protected, residuals=residuals)


def test_score_error_counts_residuals_and_their_presence():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 1.0, 2.0, 9.0]])
    res = torch.tensor([[0.5, 1.0, 2.0, 7.0], [1.0, float("inf"), 4.0, 7.0]])
    assert verdicts.score_error([_scores(values, res)], [_scores(values, res.clone())]) == (True, 0.0)
    off = res.clone()
    off[0, 1] = 1.2  # 0.2 of the row's largest unprotected residual (2.0)
    same, err = verdicts.score_error([_scores(values, off)], [_scores(values, res)])
    assert same and abs(err - 0.1) < 1e-6
    off[0, 3] = 100.0  # a protected token's residual is not judged
    assert abs(verdicts.score_error([_scores(values, off)], [_scores(values, res)])[1] - 0.1) < 1e-6
    finite = res.clone()
    finite[1, 1] = 1.0
    assert not verdicts.score_error([_scores(values, finite)], [_scores(values, res)])[0]
    assert not verdicts.score_error([_scores(values)], [_scores(values, res)])[0]
