"""The cuSZp v3 stream: golden bytes, quantization edge cases, and byte identity of the numpy
reference, the torch implementation (CPU, multi-piece) and the Triton kernels (interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from profiles.codecs import szp_reference as ref
from profiles.codecs import szp_torch

SIZES = [0, 1, 31, 32, 33, 1000, 32768, 32769, 3 * 32768 + 17]


def data(n, seed=0, outlier=True):
    x = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    if outlier and n > 100:
        x[77] = 5.0          # one block with a wide rate: more than 8 bit planes
    return x


def test_golden_fixed_stream():
    x = np.zeros(32, np.float32)
    x[0], x[1] = 3.0, -1.0                                 # eb = 0.5 -> q = 3, -1
    stream, index = ref.encode(x, 0.5, "fixed")
    assert stream.size == 1024 + 4 + 2 * 4
    assert stream[0] == 2 and not stream[1:1024].any()      # rate area padded to 1024 blocks
    assert list(stream[1024:]) == [0x40, 0, 0, 0,           # sign of value 1 at bit 30
                                   0xC0, 0, 0, 0,           # plane 0: |3|, |-1| have bit 0
                                   0x80, 0, 0, 0]           # plane 1: only |3|
    assert list(index) == [0]
    assert np.array_equal(ref.decode(stream, 32, 0.5), x)


def test_golden_plain_stream_zeroes_padding():
    x = np.array([3.0, 4.0, 2.0], np.float32)              # q = 3, 4, 2 -> deltas 3, 1, -2
    stream, _ = ref.encode(x, 0.5, "plain")
    assert stream[0] == 2
    assert list(stream[1024:]) == [0x20, 0, 0, 0, 0xC0, 0, 0, 0, 0xA0, 0, 0, 0]
    assert np.array_equal(ref.decode(stream, 3, 0.5, "plain"), x)


def test_quantization_is_not_round_half_to_even():
    d = np.array([-2.5, -1.5, -0.5, -0.49, 0.5, 1.5, 2.5], np.float32)
    expect = [-3, -2, 0, 0, 1, 2, 3]
    assert list(ref.quantize(d, 0.5)) == expect
    assert szp_torch.quantize(torch.from_numpy(d), 0.5).tolist() == expect


def test_stream_size_formula_and_rates():
    x = data(5000)
    stream, index = ref.encode(x, 1e-3)
    rates = stream[:ref.num_blocks(5000)]
    assert stream.size == 1024 + sum(4 + 4 * int(r) for r in rates if r)
    assert rates.max() > 8 and index.size == 1
    assert ref.rate_area_nbytes(32768) == 1024 and ref.rate_area_nbytes(32769) == 2048


@pytest.mark.parametrize("variant", ["fixed", "plain"])
@pytest.mark.parametrize("n", SIZES)
def test_torch_matches_reference_bytes(n, variant):
    x = data(n, seed=n)
    eb = float(np.float32(1e-3))
    s_ref, i_ref = ref.encode(x, eb, variant)
    s_t, i_t = szp_torch.encode(torch.from_numpy(x), eb, variant)
    assert np.array_equal(s_t.numpy(), s_ref)
    assert np.array_equal(i_t.numpy(), i_ref.astype(np.int64))
    d_ref = ref.decode(s_ref, n, eb, variant)
    assert np.array_equal(szp_torch.decode(s_t, n, eb, variant).numpy(), d_ref)
    assert szp_torch.stream_nbytes(torch.from_numpy(x), eb, variant) == s_ref.size


@pytest.mark.parametrize("variant", ["fixed", "plain"])
def test_torch_pieces_join_seamlessly(monkeypatch, variant):
    monkeypatch.setattr(szp_torch, "CPU_PIECE_VALUES", 2 * ref.CHUNK_VALUES)
    n = 5 * ref.CHUNK_VALUES + 123
    x = data(n, seed=3)
    x[2 * ref.CHUNK_VALUES: 3 * ref.CHUNK_VALUES] = 0.0    # an all-zero piece
    s_ref, i_ref = ref.encode(x, 2e-3, variant)
    s_t, i_t = szp_torch.encode(torch.from_numpy(x), 2e-3, variant)
    assert np.array_equal(s_t.numpy(), s_ref) and np.array_equal(i_t.numpy(), i_ref)
    out = torch.empty(n, dtype=torch.bfloat16)
    y = szp_torch.decode(s_t, n, 2e-3, variant, out=out, finish=lambda p: p.to(torch.bfloat16))
    assert torch.equal(y, torch.from_numpy(ref.decode(s_ref, n, 2e-3, variant)).bfloat16())


def test_rejects_a_stream_of_the_wrong_length():
    s, _ = ref.encode(data(100), 1e-3)
    with pytest.raises(ValueError, match="rates imply"):
        szp_torch.decode(torch.from_numpy(s[:-4].copy()), 100, 1e-3)


_TRITON_SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from profiles.codecs import szp_reference as ref, szp_triton as K
    for n in (1, 33, 1000, 32769):               # partial blocks; more than 1024 blocks
        x = (np.random.default_rng(n).standard_normal(n) * 0.02).astype(np.float32)
        if n > 100:
            x[77] = 5.0
        for variant in ("fixed", "plain"):
            s_ref, i_ref = ref.encode(x, 1e-3, variant)
            s, i = K.encode(torch.from_numpy(x), 1e-3, variant)
            assert np.array_equal(s.numpy(), s_ref), (n, variant)
            assert np.array_equal(i.numpy(), i_ref.astype(np.int64)), (n, variant)
            d = ref.decode(s_ref, n, 1e-3, variant)
            y = K.decode(s, i, n, 1e-3, variant)
            assert np.array_equal(y.numpy(), d), (n, variant)
            if n == 1000:                            # fused upcast and fused downcast
                xb = torch.from_numpy(x).bfloat16()
                s_b, _ = K.encode(xb, 1e-3, variant)
                assert np.array_equal(s_b.numpy(), ref.encode(xb.float().numpy(), 1e-3, variant)[0])
                yb = K.decode(s, i, n, 1e-3, variant, torch.bfloat16)
                assert torch.equal(yb, torch.from_numpy(d).bfloat16()), (n, variant)
    print("triton-interpreter-ok")
""")


def test_triton_kernels_match_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "triton-interpreter-ok" in res.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fixed", "plain"])
def test_gpu_paths_match_reference_bytes(variant):
    from profiles.codecs import szp_triton

    x = data(3 * 32768 + 17, seed=5)
    s_ref, i_ref = ref.encode(x, 1e-3, variant)
    xc = torch.from_numpy(x).cuda()
    s_t, _ = szp_torch.encode(xc, 1e-3, variant)
    assert np.array_equal(s_t.cpu().numpy(), s_ref)
    if szp_triton.available()[0]:
        s_k, i_k = szp_triton.encode(xc, 1e-3, variant)
        assert np.array_equal(s_k.cpu().numpy(), s_ref)
        y = szp_triton.decode(s_k, i_k, x.size, 1e-3, variant)
        assert np.array_equal(y.cpu().numpy(), ref.decode(s_ref, x.size, 1e-3, variant))


@pytest.mark.gpu
def test_cuszp_library_streams_are_byte_identical():
    from profiles.codecs import cuszp

    ok, why = cuszp.availability()
    if not ok:
        pytest.skip(why)
    x = data(3 * 32768 + 17, seed=6)
    for variant in ("fixed", "plain"):
        s_ref, _ = ref.encode(x, 1e-3, variant)
        s_c = cuszp.compress(torch.from_numpy(x).cuda(), 1e-3, variant)
        assert np.array_equal(s_c.cpu().numpy(), s_ref), variant
