"""The `ans` codec: SZ3's quantizer, the rANS coder, the payload layout, the Triton decoder under the
interpreter bit-identical to the numpy reference, and corrupt, truncated or mismatched blobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from profiles.codecs import Blob, decode, encode, get_codec
from profiles.codecs import ans
from profiles.codecs.registry import payload_tensor
from profiles.errors import CodecError


def weights(n, dtype=torch.bfloat16, seed=0, outlier=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.02
    if outlier is not None and n > 10:
        x[7] = outlier
    return x.to(dtype)


def test_quantizer_is_sz3s_linear_quantizer():
    eb = 0.5                                  # r = 2: h = (trunc(2|x|) + 1) >> 1
    x = np.array([0.0, 0.49, 0.5, 0.74, 0.75, 1.0, -0.5, -1.6, 1e6], np.float32)
    q, ok, _ = ans.quantize(x, eb)
    assert q[:8].tolist() == [0, 0, 1, 1, 1, 1, -1, -2]
    assert ok[:8].all() and not ok[8]         # beyond SZ3's radius: unpredictable
    assert ans.dequantize(q[:8], eb).tolist() == [0, 0, 1, 1, 1, 1, -1, -2]


def test_reconstruction_equals_sz3_nopred_except_outliers_stored_exactly():
    x = weights(200000, torch.float32, seed=1, outlier=0.9)
    for eb in (1e-3, 3e-3, 1.7e-2):
        a = decode(encode(x, "ans", "abs", eb, strict=0))
        s = decode(encode(x, "sz3", "abs", eb, strict=0))
        differ = a != s
        assert int(differ.sum()) <= 5 and torch.equal(a[differ], x[differ])


def test_rans_round_trips_symbols_for_partial_and_many_chunks():
    rng = np.random.default_rng(0)
    for n in (1, 31, 32, 33, 1000, 16384, 16385, 3 * 16384 + 100):
        syms = rng.choice(5, size=n, p=[0.02, 0.6, 0.3, 0.05, 0.03]).astype(np.int32)
        freqs = ans.normalize(np.bincount(syms, minlength=5), 1 << ans.PROB_BITS)
        states, offsets, words = ans.rans_encode(syms, freqs)
        assert states.size == offsets.size * 32 == 32 * -(-n // 16384)
        back = ans.rans_decode(states, offsets, words, n, freqs, np.arange(5, dtype=np.uint16))
        assert np.array_equal(back, syms), n


def test_rans_is_close_to_the_entropy():
    rng = np.random.default_rng(1)
    p = np.array([0.05, 0.6, 0.3, 0.05])
    syms = rng.choice(4, size=1 << 18, p=p).astype(np.int32)
    freqs = ans.normalize(np.bincount(syms), 1 << ans.PROB_BITS)
    states, _, words = ans.rans_encode(syms, freqs)
    bits = (16 * words.size + 32 * states.size) / syms.size
    entropy = float(-(p * np.log2(p)).sum())
    assert entropy < bits < entropy * 1.04


def test_single_symbol_needs_no_words():
    freqs = ans.normalize(np.array([0, 7]), 1 << ans.PROB_BITS)
    assert freqs.tolist() == [0, 1 << ans.PROB_BITS]
    states, offsets, words = ans.rans_encode(np.ones(5000, np.int32), freqs)
    assert words.size == 0
    assert np.array_equal(ans.rans_decode(states, offsets, words, 5000, freqs,
                                          np.arange(2, dtype=np.uint8)), np.ones(5000, np.uint8))


def test_normalize_keeps_every_present_symbol_and_the_total():
    counts = np.array([10 ** 6, 1, 0, 3, 50, 1, 1])
    f = ans.normalize(counts, 1 << 10)
    assert f.sum() == 1024 and (f[counts > 0] >= 1).all() and f[2] == 0


def test_payload_layout_and_meta():
    x = weights(40000, outlier=5.0)
    blob = encode(x, "ans", "meanabs", 0.5)
    m = blob.meta
    assert m["lanes"] == 32 and m["steps"] == 512 and m["prob_bits"] == 14
    assert m["chunks"] == 3 and m["patches"] >= 1                # the outlier is stored exactly
    sizes = ans.section_sizes(m, 40000, 2)
    assert sum(sizes) == blob.payload_nbytes and all(s % 4 == 0 for s in sizes)
    table = ans.split(payload_tensor(blob.payload), m, 40000, torch.bfloat16)[0]
    assert int(ans.frequencies(table, m).sum()) == 1 << 14
    assert decode(blob)[7].item() == x[7].item()


def test_strict_bound_and_nudged_symbols():
    x = weights(1 << 16, seed=3) * 40                            # |x| up to ~4: wide bf16 ulps
    strict = encode(x, "ans", "meanabs", 0.05)
    relaxed = encode(x, "ans", "meanabs", 0.05, strict=0)
    assert strict.options == {} and relaxed.options == {"strict": 0}
    err = (decode(strict).double() - x.double()).abs().max().item()
    assert err <= strict.abs_bound
    assert (decode(relaxed).double() - x.double()).abs().max().item() > relaxed.abs_bound
    assert strict.meta["nudged"] == 1 and relaxed.meta["nudged"] == 0
    assert strict.ratio > 0.97 * relaxed.ratio                    # strictness is nearly free


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float8_e4m3fn])
def test_nudge_moves_one_dtype_step_towards_the_reconstruction(dtype):
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float8_e4m3fn: "fp8_e4m3"}[dtype]
    xhat = np.array([1.0 + 2 ** -9, -(1.0 + 2 ** -9), 3.0 - 2 ** -6, 0.3], np.float32)
    near = ans.round_bits(xhat, name)
    far = ans.nudge(near, xhat, name)
    a, b = ans.to_f32(near, name), ans.to_f32(far, name)
    for v, r, f in zip(xhat, a, b):
        if r != v:                                               # x̂ lies between r and f
            assert min(r, f) <= v <= max(r, f)


def test_matches_sz3_nopred_ratio_on_gaussian_weights():
    x = weights(1 << 18)
    for level in (0.1, 0.5):
        a = encode(x, "ans", "meanabs", level, strict=0)
        s = encode(x, "sz3", "meanabs", level, strict=0)
        assert a.abs_bound == s.abs_bound
        assert a.ratio > 0.95 * s.ratio, (level, a.ratio, s.ratio)


def test_constant_zero_and_huge_values():
    for x in (torch.full((3000,), 0.25, dtype=torch.bfloat16), torch.zeros(100),
              torch.tensor([1e30, -1e30, 0.0, 1.0], dtype=torch.float32)):
        blob = encode(x, "ans", "abs", 1e-3)
        y = decode(Blob.from_bytes(blob.to_bytes()))
        assert (y.double() - x.double()).abs().max().item() <= 1e-3
    x = weights(5000, torch.float32, outlier=1e30)
    assert encode(x, "ans", "abs", 1e-3).meta["patches"] == 1


def _corrupt(blob, **meta):
    return Blob(blob.codec, blob.codec_version, blob.dtype, blob.shape, blob.mode, blob.level,
                blob.abs_bound, blob.options, blob.lossless_fallback, blob.fallback_reason,
                {**blob.meta, **meta}, blob.payload)


def test_corrupt_truncated_and_mismatched_blobs_are_refused_with_one_line():
    blob = encode(weights(20000), "ans", "meanabs", 0.5)
    raw = bytearray(blob.to_bytes())
    raw[len(raw) // 2] ^= 0x40
    with pytest.raises(CodecError, match="CRC32"):
        Blob.from_bytes(bytes(raw))
    with pytest.raises(CodecError, match="truncated"):
        Blob.from_bytes(blob.to_bytes()[:-9])
    future = Blob.from_bytes(blob.to_bytes())
    future = Blob(future.codec, 99, *[getattr(future, f) for f in (
        "dtype", "shape", "mode", "level", "abs_bound", "options", "lossless_fallback",
        "fallback_reason", "meta", "payload")])
    for bad, pattern in ((future, "format version 99"), (_corrupt(blob, words=3), "expected"),
                         (_corrupt(blob, radius="x"), "malformed"),
                         (_corrupt(blob, chunks=1, words=blob.meta["words"]), "expected")):
        with pytest.raises(CodecError, match=pattern) as info:
            decode(bad)
        assert "\n" not in str(info.value)
    payload = blob.payload.copy()                               # valid lengths, wrong words
    sizes = ans.section_sizes(blob.meta, 20000, 2)
    payload[sum(sizes[:4]): sum(sizes[:4]) + 64] ^= 0x5A          # the words section
    with pytest.raises(CodecError, match="corrupt"):
        decode(Blob(blob.codec, blob.codec_version, blob.dtype, blob.shape, blob.mode, blob.level,
                    blob.abs_bound, blob.options, False, None, blob.meta, payload))


def test_registry_entry():
    c = get_codec("ans")
    assert c.error_bounded and c.gpu_decodable and not c.cpu_only
    assert c.check_options({}) == {} and c.check_options({"strict": 0}) == {"strict": 0}
    with pytest.raises(CodecError, match="valid: 1, 0"):
        c.check_options({"strict": 2})


_TRITON_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from profiles.codecs import ans, ans_triton, encode
    from profiles.codecs.registry import payload_tensor
    cases = json.loads(sys.argv[1])
    for shape, dt, level, strict in cases:
        shape = shape if isinstance(shape, list) else [shape]
        n = 1
        for d in shape:
            n *= d
        dtype = getattr(torch, dt)
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, generator=g) * 0.02
        if len(shape) == 2:                        # rows of different scales
            x = (x.reshape(shape) * (0.2 + 3 * torch.rand(shape[0], 1, generator=g))).reshape(-1)
        elif len(shape) == 3:                      # each matrix's columns of different scales
            x = (x.reshape(shape) * (0.2 + 3 * torch.rand(shape[0], 1, shape[2], generator=g))
                 ).reshape(-1)
        if n > 100:
            x[77] = 3.0                            # an outlier, patched after the kernel
        x = (x * (40 if strict else 1)).to(dtype).reshape(shape)
        b = encode(x, "ans", "meanabs", level, strict=strict)
        if len(shape) > 1:
            assert b.meta.get("classes", 1) > 1, (shape, b.meta)
        secs = ans.split(payload_tensor(b.payload), b.meta, n, dtype)
        ref = ans.decode_cpu(*secs, b.meta, n, b.abs_bound, dtype)
        got = ans_triton.decode(*secs, b.meta, n, b.abs_bound, dtype)
        assert torch.equal(ref.view(torch.uint8), got.view(torch.uint8)), (shape, dt, level)
    print("triton-interpreter-ok")
""")


def test_triton_decoder_matches_reference_under_the_interpreter():
    pytest.importorskip("triton")
    cases = [[1, "bfloat16", 0.5, 1], [33, "float16", 0.5, 0], [1000, "float32", 2.0, 1],
             [16384 * 2 + 77, "bfloat16", 0.5, 1], [5000, "float8_e4m3fn", 1.0, 1],
             [20000, "bfloat16", 0.05, 0],
             [[256, 128], "bfloat16", 0.5, 1],            # classes by row
             [[2, 128, 192], "float16", 1.0, 1],          # classes by each matrix's column
             [[300, 96], "bfloat16", 0.5, 1],             # classes by row, a short last chunk
             [[3, 100, 160], "bfloat16", 0.5, 1]]         # by column, a short last chunk
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, json.dumps(cases)], env=env,
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "triton-interpreter-ok" in res.stdout


@pytest.mark.gpu
def test_gpu_decode_is_bit_identical_to_the_cpu_decode():
    x = weights(3 * 16384 + 17, outlier=4.0)
    for level in (0.1, 0.5, 2.0):
        blob = encode(x, "ans", "meanabs", level)
        assert torch.equal(decode(blob, device="cuda").cpu().view(torch.int16),
                           decode(blob).view(torch.int16))


def scaled(shape, axis, seed=0, dtype=torch.bfloat16):
    """Weights whose rows (axis 0) or columns (axis 1) have different scales, as trained FFN
    matrices do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 0.02
    scale = 0.3 + 2 * torch.rand(shape[-2] if axis == 0 else shape[-1], generator=g)
    return (x * (scale[:, None] if axis == 0 else scale)).to(dtype)


@pytest.mark.parametrize("shape,axis,want", [((512, 256), 0, "row"), ((4, 128, 256), 1, "col")])
def test_classes_shrink_the_payload_and_decode_the_same_values(shape, axis, want):
    x = scaled(shape, axis)
    one = encode(x, "ans", "meanabs", 1.0, classes=0)
    many = encode(x, "ans", "meanabs", 1.0)
    assert "classes" not in one.meta and one.options == {"classes": 0}
    assert many.meta["classes"] in ans.CLASS_CHOICES and many.meta["axis"] == want
    assert many.options == {} and many.ratio > 1.02 * one.ratio
    # the same quantization: only the entropy coding differs
    assert torch.equal(decode(many).view(torch.int16), decode(one).view(torch.int16))
    sizes = ans.section_sizes(many.meta, x.numel(), 2)
    assert sum(sizes) == many.payload_nbytes
    secs = ans.split(payload_tensor(many.payload), many.meta, x.numel(), x.dtype)
    cls = ans.classes_of(secs[1], many.meta, x.numel())
    rows = x.numel() // shape[-1]
    assert cls.cmap.size == (rows if want == "row" else x.numel() // shape[-2])
    assert sizes[1] == -(-(-(-cls.cmap.size // 4)) // 4) * 4           # 2 bits an entry


def test_class_map_packs_four_classes_to_a_byte():
    cmap = np.array([0, 1, 2, 3, 3, 2, 1], np.uint8)
    packed = ans.pack_map(cmap)
    assert packed.tolist() == [0b11100100, 0b00011011]
    assert ans.unpack_map(torch.from_numpy(packed), 7).tolist() == cmap.tolist()


def test_class_map_blocks_select_the_class_of_every_value():
    rng = np.random.default_rng(2)
    for axis, mrows, cols, matrices in (("row", 8, 64, 1), ("col", 8, 64, 3)):
        n = matrices * mrows * cols
        size = matrices * mrows if axis == "row" else matrices * cols
        cm = ans.ClassMap(rng.integers(0, 4, size).astype(np.uint8), axis, mrows, cols)
        steps = 5                                    # chunks of 160 values, a partial one last
        chunks = -(-n // (32 * steps))
        table, block = cm.blocks(chunks, steps, 1)
        full = np.zeros(chunks * steps * 32, np.int64)
        full[:n] = cm.values()
        want = full.reshape(chunks, steps, 32).transpose(1, 0, 2)
        for t in range(steps):
            got = np.broadcast_to(table[block[t]], (chunks, 32))
            live = (np.arange(chunks) * steps * 32 + t * 32) < n
            assert np.array_equal(got[live], want[t][live]), (axis, t)


def test_rans_with_classes_round_trips_symbols():
    rng = np.random.default_rng(3)
    rows, cols = 300, 64
    cmap = rng.integers(0, 2, rows).astype(np.uint8)
    cls = ans.ClassMap(cmap, "row", rows, cols)
    p = np.array([[0.1, 0.8, 0.1, 0.0], [0.05, 0.25, 0.4, 0.3]])
    syms = np.concatenate([rng.choice(4, size=cols, p=p[c]) for c in cmap]).astype(np.int32)
    counts = np.stack([np.bincount(syms.reshape(rows, cols)[cmap == c].reshape(-1),
                                   minlength=4) for c in (0, 1)])
    freqs = np.stack([ans.normalize(c, 1 << ans.PROB_BITS) for c in counts])
    states, offsets, words = ans.rans_encode(syms, freqs, classes=cls, steps=64)
    back = ans.rans_decode(states, offsets, words, syms.size, freqs,
                           np.arange(4, dtype=np.uint16), steps=64, classes=cls)
    assert np.array_equal(back, syms)


def test_no_classes_where_rows_are_not_a_multiple_of_32_values():
    assert "classes" not in encode(scaled((256, 100), 0), "ans", "meanabs", 1.0).meta
    assert "classes" not in encode(scaled((1, 4096), 0), "ans", "meanabs", 1.0).meta


def test_version_1_blobs_and_a_corrupt_class_map(monkeypatch):
    x = scaled((256, 128), 0)
    one = encode(x, "ans", "meanabs", 1.0, classes=0)          # the version-1 payload layout
    old = Blob(one.codec, 1, one.dtype, one.shape, one.mode, one.level, one.abs_bound, {},
               one.lossless_fallback, one.fallback_reason, one.meta, one.payload)
    assert torch.equal(decode(Blob.from_bytes(old.to_bytes())).view(torch.int16),
                       decode(one).view(torch.int16))
    monkeypatch.setattr(ans, "CLASS_CHOICES", (2,))
    many = encode(x, "ans", "meanabs", 1.0)
    assert many.meta["classes"] == 2
    payload = many.payload.copy()
    sizes = ans.section_sizes(many.meta, x.numel(), 2)
    payload[sizes[0]] = 0xFF                                    # class 3 of 2, four times
    bad = Blob(many.codec, many.codec_version, many.dtype, many.shape, many.mode, many.level,
               many.abs_bound, many.options, False, None, many.meta, payload)
    with pytest.raises(CodecError, match="class 3 in the class map") as info:
        decode(bad)
    assert "\n" not in str(info.value)
    for meta in ({"axis": "diagonal"}, {"cols": 100}, {"mrows": 0}, {"classes": 5}):
        with pytest.raises(CodecError, match="malformed"):
            decode(_corrupt(many, **meta))


def test_the_class_chooser_counts_on_its_sample_not_per_column_and_symbol():
    import tracemalloc

    x = scaled((16, 64, 2048), 1)                # 16 matrices of 2048 columns, ~1500 symbols
    eb = 0.01 * float(x.float().abs().mean())
    code, hist = ans.codes(x.reshape(-1), eb, True)
    radius, nudged, _ = ans.choose_radius(hist, 2)
    present = ans.symbol_counts(hist, radius, nudged) > 0
    assert present.size > 1000
    tracemalloc.start()
    try:
        chosen = ans.choose_classes(x, code, ans.symbol_table(radius, nudged), present)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert chosen is not None and chosen[0].axis == "col"
    # dense [matrices * columns, symbols] counts would take 16 * 2048 * 1500 * 8 bytes = 393 MB
    assert peak < 8 * x.numel() * x.element_size(), peak / 2**20
    freqs = chosen[1]
    assert (freqs[:, present] >= 1).all() and (freqs.sum(axis=1) == 1 << ans.PROB_BITS).all()


def test_the_class_chooser_costs_the_tables_at_the_samples_scale(monkeypatch):
    x = scaled((2048, 2048), 0)                  # 4M values: the sample is 1/16 of the rows
    chosen = encode(x, "ans", "meanabs", 0.02)
    sizes = {}
    for k in ans.CLASS_CHOICES:
        monkeypatch.setattr(ans, "CLASS_CHOICES", (k,))
        forced = encode(x, "ans", "meanabs", 0.02)
        assert forced.meta.get("classes") == k
        sizes[k] = forced.payload_nbytes
    assert chosen.payload_nbytes == min(sizes.values()), (chosen.meta.get("classes"), sizes)


@pytest.mark.parametrize("shape,axis,meta", [((256, 128), 0, {"cols": 0}),
                                             ((4, 128, 256), 1, {"mrows": 0})])
def test_a_zero_class_map_dimension_is_a_malformed_meta(shape, axis, meta):
    blob = encode(scaled(shape, axis), "ans", "meanabs", 1.0)
    assert blob.meta["axis"] == ("row" if axis == 0 else "col")
    with pytest.raises(CodecError, match="malformed") as info:
        decode(_corrupt(blob, **meta))
    assert "\n" not in str(info.value)


def test_the_triton_decoder_refuses_a_corrupt_class_map_or_table_with_a_codec_error(monkeypatch):
    pytest.importorskip("triton")
    from profiles.codecs import ans_triton

    monkeypatch.setattr(ans, "CLASS_CHOICES", (2,))
    x = scaled((256, 128), 0)
    blob = encode(x, "ans", "meanabs", 1.0)
    assert blob.meta["classes"] == 2
    sizes = ans.section_sizes(blob.meta, x.numel(), 2)
    for at, byte, want in ((sizes[0], 0xFF, "class 3 in the class map"),   # the map's first byte
                           (0, 0x00, "frequencies do not sum")):           # a table's first entry
        payload = blob.payload.copy()
        payload[at] = byte if payload[at] != byte else byte ^ 1
        secs = ans.split(payload_tensor(payload), blob.meta, x.numel(), x.dtype)
        with pytest.raises(CodecError, match=want) as info:   # refused before any launch
            ans_triton.decode(*secs, blob.meta, x.numel(), blob.abs_bound, x.dtype)
        assert "\n" not in str(info.value)
