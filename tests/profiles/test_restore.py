"""Exact undo of in-place tensor edits through compressed XOR residuals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.errors import PolicyError
from profiles.models.restore import WeightRestorer

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(1, 17), cols=st.integers(1, 33),
       scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e4]), seed=st.integers(0, 2**31 - 1))
def test_restore_is_bit_exact(dtype, rows, cols, scale, seed):
    g = torch.Generator().manual_seed(seed)
    fused = (torch.randn(3, rows, cols, generator=g) * 0.02).to(dtype)
    fused[0, 0, 0] = float("-0.0")  # signed zero must come back as -0.0
    original = fused.clone()
    restorer = WeightRestorer()
    for e in (2, 0):  # views into a fused [experts, rows, cols] parameter
        new = fused[e].float() + torch.randn(rows, cols, generator=g) * scale
        restorer.replace(fused[e], new)
    assert torch.equal(fused[1].view(torch.uint8), original[1].view(torch.uint8))
    restorer.restore()
    assert torch.equal(fused.view(torch.uint8), original.view(torch.uint8))
    assert len(restorer) == 0


def test_identity_edit_costs_almost_nothing_and_small_error_little():
    w = (torch.randn(256, 256) * 0.02).to(torch.bfloat16)
    restorer = WeightRestorer()
    restorer.replace(w, w.clone())
    assert restorer.nbytes < 100  # an all-zero residual
    restorer.replace(w, w.float() + (torch.rand(w.shape) * 2 - 1) * 1e-3)
    assert restorer.nbytes < w.numel() * w.element_size()  # less than a copy
    restorer.restore()


def test_foreign_edit_is_detected():
    w = torch.randn(8, 8)
    restorer = WeightRestorer()
    restorer.replace(w, w + 1)
    w[0, 0] = 123.0  # something else writes into the weights meanwhile
    with pytest.raises(PolicyError, match="did not return to their original bits"):
        restorer.restore()
