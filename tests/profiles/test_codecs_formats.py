"""The quantized formats users run as codecs (`gq`, ...): exact byte counts, golden layouts,
round trips in every dtype, the measured bound, refusal of bad blobs, policy specs, and
hypothesis properties (zeros, constants, one huge outlier, subnormals, partial blocks)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profiles.codecs import Blob, compressed_nbytes, decode, encode, get_codec, list_codecs
from profiles.codecs import gq, nf4
from profiles.errors import CodecError
from profiles.policy import StorageSpec

# (codec, options, payload bytes for n values)
FORMATS = [
    ("gq", {"bits": 4, "group": 64}, lambda n: 4 * math.ceil(n / 64) + math.ceil(n / 2)),
    ("gq", {"bits": 3, "group": 128}, lambda n: 4 * math.ceil(n / 128) + math.ceil(3 * n / 8)),
    ("gq", {"bits": 2, "group": 32}, lambda n: 4 * math.ceil(n / 32) + math.ceil(n / 4)),
    ("gq", {"bits": 8, "group": 64}, lambda n: 4 * math.ceil(n / 64) + n),
    ("nf4", {"dq": True},
     lambda n: 4 + 4 * math.ceil(n / 16384) + math.ceil(n / 64) + math.ceil(n / 2)),
    ("nf4", {"dq": False}, lambda n: 4 * math.ceil(n / 64) + math.ceil(n / 2)),
    ("mxfp4", {"scale": "ocp"}, lambda n: 17 * math.ceil(n / 32)),
    ("mxfp4", {"scale": "llamacpp"}, lambda n: 17 * math.ceil(n / 32)),
    ("mxfp4", {"scale": "ceil"}, lambda n: 17 * math.ceil(n / 32)),
    ("q2_k", {}, lambda n: 84 * math.ceil(n / 256)),
    ("q3_k", {}, lambda n: 110 * math.ceil(n / 256)),
    ("q4_k", {}, lambda n: 144 * math.ceil(n / 256)),
    ("q5_k", {}, lambda n: 176 * math.ceil(n / 256)),
    ("q6_k", {}, lambda n: 210 * math.ceil(n / 256)),
    ("q8_0", {}, lambda n: 34 * math.ceil(n / 32)),
]
IDS = [f"{c}-{'-'.join(f'{k}{v}' for k, v in o.items())}".rstrip("-") for c, o, _ in FORMATS]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def weights(shape=(64, 48), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def test_formats_are_registered_not_error_bounded_and_gpu_decodable():
    names = [c.name for c in list_codecs()]
    for name in sorted({c for c, _, _ in FORMATS}):
        assert name in names
        c = get_codec(name)
        assert not c.error_bounded and c.gpu_decodable and not c.cpu_only
        assert c.decode_where() == "CPU or GPU" and "not error-bounded" in c.description


@pytest.mark.parametrize("codec,opts,size", FORMATS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5), (2, 3, 33), (4, 300)])
def test_round_trip_dtype_shape_and_exact_bytes(codec, opts, size, dtype, shape):
    x = weights(shape, dtype) if math.prod(shape) else torch.zeros(shape, dtype=dtype)
    blob = encode(x, codec, **opts)
    raw = blob.to_bytes()
    y = decode(Blob.from_bytes(raw))
    assert y.dtype == dtype and tuple(y.shape) == shape
    n = math.prod(shape)
    assert blob.payload_nbytes == (size(n) if n else 0)
    assert blob.nbytes == len(raw) == blob.header_nbytes + blob.payload_nbytes
    assert compressed_nbytes(x, codec, **opts) == blob.nbytes
    assert blob.mode is None and blob.level is None and blob.options == opts
    err = (y.to(torch.float64) - x.to(torch.float64)).abs()
    assert blob.abs_bound == (float(err.max()) if n else 0.0)


@pytest.mark.parametrize("codec,opts,size", FORMATS, ids=IDS)
def test_bits_per_weight_on_a_large_tensor(codec, opts, size):
    x = weights((256, 256))
    blob = encode(x, codec, **opts)
    assert blob.payload_nbytes == size(x.numel())
    assert blob.ratio == pytest.approx(2 * x.numel() / blob.nbytes)


def test_gq_golden_bytes():
    x = np.array([0.0, 1.0, 2.0, 3.0], np.float32)                 # lo 0, hi 3: s = 1, z = 0
    assert list(gq.encode(x, bits=2, group=32)) == [0x00, 0x3C, 0x00, 0x00, 0xE4]
    x = np.arange(-1.0, 7.0, dtype=np.float32)                      # s = 1, z = 1: q = 0 ... 7
    p = gq.encode(x, bits=3, group=32)
    assert list(p[4:]) == [0x88, 0xC6, 0xFA]                         # 3-bit codes, LSB first
    assert list(p[2:4]) == [0x00, 0x3C]                              # zero 1.0 in fp16
    assert torch.equal(gq.decode(torch.from_numpy(p), 8, 3, 32), torch.from_numpy(x))


def test_gq_error_is_half_a_step_and_groups_run_over_the_flattened_tensor():
    x = weights((8, 96), torch.float32)
    y = decode(encode(x, "gq", bits=4, group=32))
    flat = x.reshape(-1, 32)
    lo = flat.min(dim=1).values.clamp(max=0)
    hi = flat.max(dim=1).values.clamp(min=0)
    step = ((hi - lo) / 15).to(torch.float16).float()
    err = (y - x).reshape(-1, 32).abs().max(dim=1).values
    assert torch.all(err <= step * 0.5 * (1 + 1e-2) + 1e-7)


@pytest.mark.parametrize("codec,opts,size", FORMATS, ids=IDS)
def test_bad_blobs_are_refused_with_one_line(codec, opts, size):
    blob = encode(weights(), codec, **opts)
    with pytest.raises(CodecError) as exc:
        decode(replace(blob, codec_version=blob.codec_version + 1))
    assert "format version" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CodecError) as exc:
        decode(replace(blob, payload=blob.payload[:-1]))
    assert "corrupt" in str(exc.value) and "\n" not in str(exc.value)
    raw = bytearray(blob.to_bytes())
    raw[len(raw) // 2] ^= 0x01
    with pytest.raises(CodecError, match="CRC32"):
        Blob.from_bytes(bytes(raw))
    with pytest.raises(CodecError, match="truncated"):
        Blob.from_bytes(blob.to_bytes()[:-3])


def test_nf4_tables_are_pinned():
    # the 8-bit dynamic map decodes every double-quantized absmax: blobs depend on it bit for bit
    digest = hashlib.sha256(nf4.dynamic_map().numpy().tobytes()).hexdigest()
    assert digest[:16] == "e732639a65f497b4"
    assert len(nf4.NF4) == 16 and nf4.NF4[7] == 0.0 and nf4.NF4[0] == -1.0 and nf4.NF4[15] == 1.0


def test_nf4_layout_high_nibble_first_and_dq_bytes():
    x = np.zeros(64, np.float32)
    x[0], x[1] = 1.0, -1.0                      # absmax 1: codes 15 and 0
    p = nf4.encode(x, dq=False)
    assert list(p[:4].view(np.float32)) == [1.0] and p[4] == 0xF0 and p.size == 4 + 32
    assert nf4.payload_nbytes(64 * 256 * 2, dq=True) == 4 + 8 + 512 + 64 * 256


def test_unknown_options_are_refused():
    with pytest.raises(CodecError, match="valid: 2, 3, 4, 8"):
        encode(weights(), "gq", bits=5)
    with pytest.raises(CodecError, match="valid: 32, 64, 128"):
        encode(weights(), "gq", group=16)


def test_policy_specs_name_the_formats():
    spec = StorageSpec.parse("gq,bits=3,group=128")
    assert spec.codec == "gq" and dict(spec.codec_options) == {"bits": 3, "group": 128}
    assert not spec.error_bounded and StorageSpec.parse(spec.describe()) == spec
    assert dict(StorageSpec.parse("gq").codec_options) == {"bits": 4, "group": 64}
    for text in ("nf4,dq=false", "nf4,dq=False", "nf4,dq=0"):
        assert dict(StorageSpec.parse(text).codec_options) == {"dq": False}
    spec = StorageSpec.parse("nf4,dq=false")
    assert StorageSpec.parse(spec.describe()).codec_options == {"dq": False}
    assert dict(StorageSpec.parse("nf4").codec_options) == {"dq": True}
    assert encode(weights(), "nf4", dq="false").options == {"dq": False}
    with pytest.raises(Exception, match="valid: True, False"):
        StorageSpec.parse("nf4,dq=maybe")


# --- properties -------------------------------------------------------------------------------

DTYPE_LIMIT = {torch.bfloat16: 1e30, torch.float16: 6e4, torch.float32: 1e30,
               torch.float8_e4m3fn: 440.0}


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(list(DTYPE_LIMIT)))
    lim = DTYPE_LIMIT[dtype]
    n = draw(st.integers(1, 600))
    kind = draw(st.sampled_from(["zeros", "constant", "outlier", "subnormal", "normal"]))
    if kind == "zeros":
        x = torch.zeros(n)
    elif kind == "constant":
        x = torch.full((n,), draw(st.sampled_from([0.375, -2.0, 1e-3, 3e4])))
    else:
        base = draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=n, max_size=n))
        x = torch.tensor(base, dtype=torch.float32) * 0.02
        if kind == "outlier":
            x[draw(st.integers(0, n - 1))] = draw(st.sampled_from([lim, -lim, 8.0, -300.0]))
        elif kind == "subnormal":
            x = x * 1e-36
    return x.clamp(-lim, lim).to(dtype)


@pytest.mark.parametrize("codec,opts,size", FORMATS, ids=IDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=tensors())
def test_properties(codec, opts, size, x):
    blob = Blob.from_bytes(encode(x, codec, **opts).to_bytes())
    y = decode(blob)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert blob.payload_nbytes == size(x.numel())
    yd, xd = y.to(torch.float64), x.to(torch.float64)
    assert torch.isfinite(yd).all()
    err = float((yd - xd).abs().max())
    assert blob.abs_bound == err and math.isfinite(err)
    if not x.to(torch.float32).any():
        assert not yd.any()                                          # zeros stay zeros
    assert float(yd.abs().max()) <= 2 * float(xd.abs().max()) + 1e-30
