"""The kvpress capture's row matcher (tests/parity/kvpress_capture.py) is exact on any CPU.

It used to locate rows through a float64 projection computed over ``L`` rows and again over
the ``n`` returned ones; on an AMD EPYC the two products rounded some rows differently and the
parity suite errored at set-up. Rows are now matched by their bytes.
"""

from __future__ import annotations

import pytest
import torch

from parity.kvpress_capture import RowIndex


@pytest.mark.parametrize("length, dim, kept", [(1024, 32, 300), (600, 64, 200), (700, 64, 69), (700, 64, 699)])
def test_gathered_rows_are_found_at_their_positions(length, dim, kept):
    gen = torch.Generator().manual_seed(length + dim + kept)
    keys = torch.randn(3, length, dim, generator=gen)
    idx = torch.stack([torch.randperm(length, generator=gen)[:kept].sort().values for _ in range(3)])
    returned = keys.gather(1, idx[..., None].expand(-1, -1, dim))  # what kvpress's compress returns
    found = RowIndex(keys).positions(returned)
    assert all(torch.equal(f, i) for f, i in zip(found, idx))


def test_a_row_one_ulp_off_is_not_a_row_of_the_input():
    keys = torch.randn(2, 50, 16)
    returned = keys[:, :10].clone()
    returned[1, 3, 5] = torch.nextafter(returned[1, 3, 5], torch.tensor(float("inf")))
    with pytest.raises(RuntimeError, match="head 1: a returned key row is not a row"):
        RowIndex(keys).positions(returned)


def test_duplicate_input_rows_are_refused():
    keys = torch.randn(1, 20, 8)
    keys[0, 7] = keys[0, 2]
    with pytest.raises(RuntimeError, match="duplicate key rows"):
        RowIndex(keys)
