"""The selection order: protected (by position), then preferred, then the rest, by value."""

from __future__ import annotations

import pytest
import torch

from vllm_kvevict.policies import LayerScores, rank
from vllm_kvevict.policies.ranking import layer_order


def test_rank_is_protected_then_preferred_then_values_ties_to_the_lower_position():
    values = torch.tensor([[5.0, 1.0, 3.0, 3.0, 9.0, 2.0]])
    protected = torch.tensor([[False, False, False, False, True, True]])
    preferred = torch.tensor([[False, True, False, False, False, False]])
    scores = LayerScores(values=values, protected=protected, preferred=preferred)
    # protected 4, 5 (by position, not by value); preferred 1; then 0 (5), 2 and 3 (tied 3)
    assert rank(scores).tolist() == [[3, 2, 4, 5, 0, 1]]
    assert layer_order(scores).tolist() == [4, 5, 1, 0, 2, 3]


def test_layer_order_breaks_ties_toward_the_lower_head():
    values = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    scores = LayerScores.unprotected(values).protect(torch.tensor([[False, False], [True, False]]))
    assert layer_order(scores).tolist() == [2, 1, 0, 3]  # (1, 0) protected; 2 at (0, 1); 1 at (0, 0), (1, 1)


def test_layer_scores_check_their_shapes_and_types():
    with pytest.raises(ValueError, match="float32"):
        LayerScores.unprotected(torch.zeros(3))
    with pytest.raises(ValueError, match="protected"):
        LayerScores(values=torch.zeros(2, 3), protected=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="head_budgets"):
        LayerScores(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), head_budgets=torch.zeros(3))
