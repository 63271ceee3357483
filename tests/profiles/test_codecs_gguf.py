"""moesz's GGUF-layout formats against `gguf` (llama.cpp's own Python package), bit for bit:
every decoder equals `gguf.quants.dequantize`, and the encoders `gguf` has (MXFP4, Q8_0) produce
the same bytes. Skipped with the reason where `gguf` is not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from profiles.codecs import mxfp4

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    x[7] = 3.1                                           # one outlier block
    x[100:200] = 0.0                                     # all-zero blocks
    x[300:340] = np.linspace(-1e-3, 2e-3, 40, dtype=np.float32)
    x[400:800] *= 1000.0                                 # a wide-range stretch
    return x


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


def test_mxfp4_llamacpp_rule_bytes_equal_gguf_quantize():
    x = data(32 * 2000)
    ref = quants.quantize(x.reshape(-1, 32), T.MXFP4).reshape(-1)
    assert np.array_equal(mxfp4.encode(x, "llamacpp"), ref)


@pytest.mark.parametrize("rule", mxfp4.RULES)
def test_mxfp4_decode_equals_gguf_dequantize(rule):
    x = data(32 * 2000)
    p = mxfp4.encode(x, rule)
    ref = quants.dequantize(p.reshape(-1, mxfp4.BLOCK_NBYTES), T.MXFP4).reshape(-1)
    assert same_bits(mxfp4.decode(torch.from_numpy(p), x.size, rule).numpy(), ref)


def test_mxfp4_rounding_rules_golden():
    x = np.array([0.75, 1.25, 1.75, 2.5, 3.5, 5, 0.25, 4, -0.75, -3.5], np.float32)   # X = 1
    codes = {}
    for rule in mxfp4.RULES:
        p = mxfp4.encode(x, rule)
        assert p[0] == 127 and p.size == 17
        codes[rule] = list(np.concatenate([p[1:] & 15, p[1:] >> 4])[:10])
    assert codes["ocp"] == [2, 2, 4, 4, 6, 6, 0, 6, 10, 14]        # ties to even mantissa
    assert codes["llamacpp"] == [1, 2, 3, 4, 5, 6, 0, 6, 9, 13]    # ties to the lower code
    assert codes["ceil"] == codes["ocp"]                           # 5 <= 6: same exponent
    big = np.array([7.0], np.float32)                               # 7 > 6 X: ocp clamps
    assert list(mxfp4.encode(big, "ocp")[:2]) == [127, 7]           # 6
    assert list(mxfp4.encode(big, "ceil")[:2]) == [128, 6]          # X = 2: 3.5 -> 4, i.e. 8
