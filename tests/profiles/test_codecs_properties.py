"""Property tests (hypothesis) of the guarantee in issue 2, for every error-bounded codec and mode:

|decoded - x| <= abs_bound + |x|·2^-22 + half a gap of the original dtype, and wherever
abs_bound + |x|·2^-22 is below half the gap to x's nearer neighbour, x comes back exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiles.codecs import BOUND_MODES, Blob, decode, encode
from tests.profiles.codec_helpers import exact_where_expected, guarantee

DTYPE_LIMIT = {torch.bfloat16: 1e6, torch.float16: 6e4, torch.float32: 1e6,
               torch.float8_e4m3fn: 440.0}
CODECS = [("szp", {"variant": "fixed"}), ("szp", {"variant": "plain"}),
          ("sz3", {"predictor": "nopred"}), ("sz3", {"predictor": "interp-lorenzo"}),
          ("ans", {}), ("szp", {"strict": 0}), ("sz3", {"strict": 0}), ("ans", {"strict": 0})]
STRICT = [("szp", {"variant": "fixed"}), ("szp", {"variant": "plain"}),
          ("sz3", {"predictor": "nopred"}), ("ans", {})]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(list(DTYPE_LIMIT)))
    lim = DTYPE_LIMIT[dtype]
    n = draw(st.integers(1, 300))
    scale = draw(st.sampled_from([1e-30, 1e-5, 0.02, 1.0, lim / 10]))
    base = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=n, max_size=n))
    x = torch.tensor(base, dtype=torch.float32) * scale
    specials = draw(st.lists(st.sampled_from([0.0, -0.0, 1e-40, -3e-39, 2.0 ** -133, lim, -lim]),
                             max_size=4))
    for i, v in enumerate(specials):
        x[(7 * i) % n] = v
    return x.clamp(-lim, lim).to(dtype)


levels = st.one_of(st.floats(1e-6, 3.0), st.sampled_from([1e-3, 0.1, 0.5, 0.8]))


@pytest.mark.parametrize("codec,opts", CODECS, ids=lambda v: str(v))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=tensors(), mode=st.sampled_from(BOUND_MODES), level=levels)
def test_error_bound_guarantee(codec, opts, x, mode, level):
    blob = Blob.from_bytes(encode(x, codec, mode, level, **opts).to_bytes())
    y = decode(blob)
    assert y.dtype == x.dtype and y.shape == x.shape
    err, allowed = guarantee(x, y, blob.abs_bound)
    assert np.all(err <= allowed), (blob.abs_bound, err.max(), allowed[err.argmax()])
    if x.dtype != torch.float32:
        must = exact_where_expected(x, y, blob.abs_bound)
        same = x.reshape(-1).to(torch.float64).numpy() == y.reshape(-1).to(torch.float64).numpy()
        assert np.all(same[must])


@settings(max_examples=30, deadline=None)
@given(x=tensors(), codec=st.sampled_from(["lossless", "raw", "rtn8", "rtn4"]))
def test_other_codecs_round_trip_dtype_shape_and_count_bytes(x, codec):
    blob = encode(x, codec)
    raw = blob.to_bytes()
    y = decode(Blob.from_bytes(raw))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert blob.nbytes == len(raw) and blob.ratio == blob.original_nbytes / len(raw)
    if codec in ("lossless", "raw"):
        assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))
    else:
        err = (y.to(torch.float64) - x.to(torch.float64)).abs().max().item()
        assert err == pytest.approx(blob.abs_bound, abs=0)


@st.composite
def hard_tensors(draw):
    """Heavy tails, one huge outlier, constants and subnormals, in every dtype."""
    dtype = draw(st.sampled_from(list(DTYPE_LIMIT)))
    lim = DTYPE_LIMIT[dtype]
    n = draw(st.integers(1, 400))
    kind = draw(st.sampled_from(["heavy", "outlier", "constant", "subnormal"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    if kind == "heavy":                                  # student-t with 1-3 degrees of freedom
        dof = draw(st.sampled_from([1, 2, 3]))
        chi2 = (torch.randn(n, dof, generator=g) ** 2).mean(dim=1)
        x = torch.randn(n, generator=g) / chi2.sqrt() * draw(st.sampled_from([0.02, 1.0]))
    elif kind == "outlier":
        x = torch.randn(n, generator=g) * 0.02
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([1.0, 174 * 0.02, lim / 2, -lim]))
    elif kind == "constant":
        x = torch.full((n,), draw(st.sampled_from([0.0, 0.375, -3.0, lim / 4])))
    else:
        tiny = {torch.bfloat16: 1e-39, torch.float16: 3e-6, torch.float32: 1e-40,
                torch.float8_e4m3fn: 2e-3}[dtype]
        x = torch.randn(n, generator=g) * tiny
    return x.clamp(-lim, lim).to(dtype)


@pytest.mark.parametrize("codec,opts", STRICT, ids=lambda v: str(v))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(tensors(), hard_tensors()), mode=st.sampled_from(BOUND_MODES), level=levels)
def test_strict_bound_holds_after_rounding_to_the_dtype(codec, opts, x, mode, level):
    blob = Blob.from_bytes(encode(x, codec, mode, level, **opts).to_bytes())
    y = decode(blob)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = (y.to(torch.float64) - x.to(torch.float64)).abs()
    assert float(err.max()) <= blob.abs_bound, (blob.abs_bound, float(err.max()))
