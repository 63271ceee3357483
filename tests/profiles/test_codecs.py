"""Codec interface: blobs, bound modes, fallbacks, dtype/shape round trips, ratio accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from profiles.codecs import BOUND_MODES, Blob, compressed_nbytes, decode, encode, get_codec, \
    list_codecs, roundtrip
from profiles.errors import BoundError, CodecError

LOCAL = ["sz3", "szp", "lossless", "rtn8", "rtn4", "raw", "ans"]   # usable without a GPU
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def weights(shape=(64, 48), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def test_registry_lists_every_codec_with_flags():
    names = [c.name for c in list_codecs()]
    assert names[:7] == ["sz3", "szp", "cuszp", "lossless", "rtn8", "rtn4", "raw"]
    assert "ans" in names and get_codec("ans").error_bounded and get_codec("ans").gpu_decodable
    assert BOUND_MODES == ("abs", "rel", "meanabs", "std")
    assert get_codec("szp").error_bounded and get_codec("szp").gpu_decodable
    assert get_codec("sz3").cpu_only and not get_codec("sz3").gpu_decodable
    assert not get_codec("rtn8").error_bounded and not get_codec("lossless").error_bounded


def test_unknown_codec_lists_valid_choices():
    with pytest.raises(CodecError, match="valid codecs: sz3, szp, cuszp"):
        encode(weights(), "zfp")


@pytest.mark.parametrize("level", [0, -1.0, float("nan"), float("inf"), "abc"])
def test_bad_level_is_a_bound_error(level):
    with pytest.raises(BoundError, match="level"):
        encode(weights(), "szp", "meanabs", level)


def test_unknown_mode_and_option():
    with pytest.raises(BoundError, match="abs, rel, meanabs, std"):
        encode(weights(), "szp", "psnr", 0.5)
    with pytest.raises(CodecError, match="valid: fixed, plain"):
        encode(weights(), "szp", "abs", 1e-3, variant="outlier")
    with pytest.raises(CodecError, match="unknown option"):
        encode(weights(), "sz3", "abs", 1e-3, level2=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("codec", ["szp", "sz3", "raw"])
def test_nan_and_inf_are_rejected(codec, bad):
    x = weights(dtype=torch.float32)
    x[3, 4] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode(x, codec, "abs", 1e-3)


def test_unsupported_dtypes_are_rejected():
    with pytest.raises(CodecError, match="not supported"):
        encode(torch.arange(10, dtype=torch.int32), "szp", "abs", 1e-3)
    with pytest.raises(CodecError, match="not supported"):
        encode(np.zeros(4, dtype=np.float64), "szp", "abs", 1e-3)


@pytest.mark.parametrize("codec", LOCAL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (5, 0), (3, 5), (2, 3, 33)])
def test_dtype_shape_round_trip_and_ratio_accounting(codec, dtype, shape):
    x = weights(shape, dtype) if math.prod(shape) else torch.zeros(shape, dtype=dtype)
    blob = encode(x, codec, "meanabs", 0.5)
    raw = blob.to_bytes()
    back = Blob.from_bytes(raw)
    y = decode(back)
    assert y.dtype == dtype and tuple(y.shape) == shape
    itemsize = 1 if dtype == torch.float8_e4m3fn else torch.empty((), dtype=dtype).element_size()
    assert blob.original_nbytes == math.prod(shape) * itemsize
    assert blob.nbytes == len(raw) == back.nbytes
    assert blob.ratio == pytest.approx(blob.original_nbytes / len(raw))
    assert compressed_nbytes(x, codec, "meanabs", 0.5) == blob.nbytes
    if codec in ("lossless", "raw"):
        assert torch.equal(y.reshape(-1).view(torch.uint8), x.reshape(-1).view(torch.uint8))


def test_non_contiguous_views_and_numpy_inputs():
    base = weights((48, 64), torch.float32)
    view = base.t()[::2]
    assert not view.is_contiguous()
    y = decode(encode(view, "szp", "abs", 1e-3))
    assert y.shape == view.shape
    assert float((y - view).abs().max()) <= 1e-3 * (1 + 2 ** -20)
    for arr in (base.numpy(), base.numpy().astype(np.float16)):
        blob = encode(arr, "szp", "abs", 1e-3)
        assert blob.dtype == ("fp32" if arr.dtype == np.float32 else "fp16")
        assert decode(blob).shape == arr.shape


def test_blob_header_records_the_request():
    x = weights()
    blob = encode(x, "sz3", "meanabs", 0.3, predictor="lorenzo")
    head = blob.header_dict()
    assert head["codec"] == "sz3" and head["codec_version"] == 2
    assert head["dtype"] == "bf16" and head["shape"] == [64, 48]
    assert head["mode"] == "meanabs" and head["level"] == 0.3
    assert head["options"] == {"predictor": "lorenzo"} and head["lossless_fallback"] is False
    mean_abs = float(x.float().abs().mean())
    assert blob.abs_bound == pytest.approx(0.3 * mean_abs, rel=1e-6)
    assert blob.abs_bound <= 0.3 * mean_abs * (1 + 1e-6)
    assert float(np.float32(blob.abs_bound)) == blob.abs_bound       # an exact fp32 value


@pytest.mark.parametrize("mode,expect", [("abs", lambda x: 0.1), ("rel", lambda x: 0.1 * (x.max() - x.min())),
                                          ("meanabs", lambda x: 0.1 * np.abs(x).mean()),
                                          ("std", lambda x: 0.1 * x.std())])
def test_bound_modes_resolve(mode, expect):
    x = weights(dtype=torch.float32).double().numpy()
    blob = encode(torch.from_numpy(x.astype(np.float32)), "szp", mode, 0.1)
    assert blob.abs_bound == pytest.approx(float(expect(x)), rel=1e-5)


def test_zero_bound_falls_back_to_lossless():
    const = torch.full((40, 40), 0.375, dtype=torch.bfloat16)
    for x, mode in ((const, "rel"), (torch.zeros(100), "meanabs"), (const, "std")):
        blob = encode(x, "szp", mode, 0.5)
        assert blob.lossless_fallback and blob.abs_bound == 0.0
        assert "resolves to 0" in blob.fallback_reason
        assert torch.equal(decode(Blob.from_bytes(blob.to_bytes())), x)


def test_saturation_and_tiny_bounds_fall_back_to_lossless():
    x = torch.tensor([1.0e6, -3.0, 0.5, 2.0e-3], dtype=torch.float32)
    blob = encode(x, "szp", "abs", 1e-4)        # 1e6 / 2e-4 = 5e9 >= 2^30
    assert blob.lossless_fallback and "saturate" in blob.fallback_reason
    assert torch.equal(decode(blob), x)
    blob = encode(x, "szp", "abs", 1e-40)
    assert blob.lossless_fallback and "smallest normal" in blob.fallback_reason
    assert torch.equal(decode(blob), x)
    assert not encode(x, "szp", "abs", 1e-2).lossless_fallback


@pytest.mark.parametrize("pos", ["magic", "header", "payload", "crc"])
def test_flipped_byte_is_detected(pos):
    raw = bytearray(encode(weights(), "szp", "meanabs", 0.5).to_bytes())
    at = {"magic": 0, "header": 20, "payload": len(raw) - 40, "crc": len(raw) - 1}[pos]
    raw[at] ^= 0x10
    with pytest.raises(CodecError, match="magic|CRC32|malformed"):
        Blob.from_bytes(bytes(raw))


@pytest.mark.parametrize("cut", [1, 10, 30, -5, -1])
def test_truncated_blob_is_detected(cut):
    raw = encode(weights(), "sz3", "meanabs", 0.5).to_bytes()
    with pytest.raises(CodecError, match="truncated|shorter|CRC32"):
        Blob.from_bytes(raw[:cut] if cut > 0 else raw[:len(raw) + cut])


def test_blob_files_are_written_atomically_and_read_back(tmp_path):
    blob = encode(weights(), "szp", "meanabs", 0.5, variant="plain")
    path = tmp_path / "sub" / "w.blob"
    blob.save(path)
    again = Blob.load(path)
    assert again.options == {"variant": "plain"} and again.nbytes == blob.nbytes
    assert torch.equal(decode(again), decode(blob))
    assert [p.name for p in path.parent.iterdir()] == ["w.blob"]
    with pytest.raises(CodecError, match="no such blob file"):
        Blob.load(tmp_path / "missing.blob")


def test_rtn_reports_measured_max_error_as_bound():
    x = weights((32, 100), torch.float32)
    for name, qmax in (("rtn8", 127), ("rtn4", 7)):
        y, blob = roundtrip(x, name)
        err = float((y - x).abs().max())
        assert blob.abs_bound == pytest.approx(err) and blob.mode is None and blob.level is None
        row_max = x.abs().amax(dim=1, keepdim=True)
        assert torch.all((y - x).abs() <= row_max / qmax / 2 * (1 + 1e-6))
    assert encode(weights((33,)), "rtn4").payload_nbytes == 4 + 17     # one scale, 33 nibbles


def test_lossless_is_exact_and_beats_raw_on_bf16_weights():
    x = weights((256, 256))
    blob = encode(x, "lossless")
    assert torch.equal(decode(blob), x)
    assert blob.ratio > 1.3 and encode(x, "raw").ratio < 1.0


def test_fp8_ratio_counts_one_byte_per_value():
    x = weights((128, 128), torch.float8_e4m3fn)
    assert encode(x, "raw").original_nbytes == 128 * 128
    blob = encode(x, "szp", "meanabs", 0.5)
    assert blob.ratio == pytest.approx(128 * 128 / blob.nbytes)


def test_roundtrip_equals_encode_then_decode():
    x = weights()
    y, blob = roundtrip(x, "szp", "std", 0.2)
    assert torch.equal(y, decode(encode(x, "szp", "std", 0.2)))
    assert blob.abs_bound == encode(x, "szp", "std", 0.2).abs_bound


def test_cuda_requests_fail_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(CodecError, match="no CUDA GPU"):
        decode(encode(weights(), "szp", "meanabs", 0.5), device="cuda")
    with pytest.raises(CodecError, match="MOESZ_CUSZP_LIB|no CUDA GPU"):
        encode(weights(), "cuszp", "meanabs", 0.5)


def test_unreadable_tensor_files_are_codec_errors(tmp_path):
    from safetensors.torch import save_file

    from profiles.codecs.sources import load_tensors

    good = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4, 4, dtype=torch.bfloat16)}, str(good))
    assert [n for n, _ in load_tensors(str(good))] == ["w"]
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(CodecError, match="cannot read as .safetensors"):
        load_tensors(str(bad))
