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
          ("sz3", {"predictor": "nopred"}), ("sz3", {"predictor": "interp-lorenzo"})]


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
