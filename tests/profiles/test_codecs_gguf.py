"""moesz's GGUF-layout formats against `gguf` (llama.cpp's own Python package), bit for bit:
every decoder equals `gguf.quants.dequantize`, and the encoders `gguf` has (MXFP4, Q8_0) produce
the same bytes. Skipped with the reason where `gguf` is not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from profiles.codecs import kquants, mxfp4

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


@pytest.mark.parametrize("qtype", list(kquants.TYPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_kquant_decode_equals_gguf_dequantize(qtype, seed):
    x = data(256 * 64, seed)
    p = kquants.encode(x, qtype)
    block, nbytes = kquants.TYPES[qtype]
    assert p.size == nbytes * x.size // block
    ref = quants.dequantize(p.reshape(-1, nbytes), getattr(T, qtype.upper())).reshape(-1)
    assert same_bits(kquants.decode(torch.from_numpy(p), x.size, qtype).numpy(), ref)


@pytest.mark.parametrize("qtype", list(kquants.TYPES))
def test_kquant_layout_sizes_match_gguf(qtype):
    block, nbytes = kquants.TYPES[qtype]
    assert gguf.GGML_QUANT_SIZES[getattr(T, qtype.upper())] == (block, nbytes)


def test_q8_0_bytes_equal_gguf_quantize():
    x = data(32 * 3000)
    x[5000:5032] = np.linspace(-127, 127, 32, dtype=np.float32) / 64    # ties at .5 steps
    ref = quants.quantize(x.reshape(-1, 32), T.Q8_0).reshape(-1)
    assert np.array_equal(kquants.encode(x, "q8_0"), ref)


def test_kquant_partial_block_is_padded_and_counted():
    x = data(1000)[:300]
    for qtype, (block, nbytes) in kquants.TYPES.items():
        p = kquants.encode(x, qtype)
        assert p.size == nbytes * -(-300 // block)
        y = kquants.decode(torch.from_numpy(p), 300, qtype)
        full = np.zeros(-(-300 // block) * block, np.float32)
        full[:300] = x
        assert torch.equal(y, kquants.decode(torch.from_numpy(kquants.encode(full, qtype)),
                                             300, qtype))


@pytest.mark.parametrize("qtype,rel_rmse", [("q2_k", 0.31), ("q3_k", 0.16), ("q4_k", 0.075),
                                            ("q5_k", 0.038), ("q6_k", 0.019), ("q8_0", 0.0056)])
def test_kquant_error_on_gaussian_weights_is_llamacpp_like(qtype, rel_rmse):
    # relative RMSE of llama.cpp's reference quantizers on N(0, 1) data (measured here: 0.299,
    # 0.151, 0.072, 0.036, 0.018, 0.0054): a broken scale search shows up as a large excess
    x = np.random.default_rng(1).standard_normal(256 * 400).astype(np.float32)
    y = kquants.decode(torch.from_numpy(kquants.encode(x, qtype)), x.size, qtype).numpy()
    assert np.sqrt(np.mean((y - x) ** 2)) < rel_rmse
