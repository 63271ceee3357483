"""The strict bound (default) and the relaxed one (strict=0) of sz3, szp and ans: patches, labels,
format versions, the runtime's in-place decode, and corrupt patch sections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from profiles.codecs import Blob, compressed_nbytes, decode, encode, patches
from profiles.codecs.registry import payload_tensor
from profiles.errors import CodecError
from profiles.policy import StorageSpec

CODECS = ["sz3", "szp", "ans"]


def wide(n=1 << 14, seed=0):
    """Weights up to ~4 in bf16, where half an ulp (up to 0.016) is a large part of the bound."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.8).bfloat16()


def max_err(blob, x):
    return float((decode(blob).double() - x.double()).abs().max())


@pytest.mark.parametrize("codec", CODECS)
def test_strict_holds_where_relaxed_does_not(codec):
    x = wide()
    strict = encode(x, codec, "abs", 0.02)
    relaxed = encode(x, codec, "abs", 0.02, strict=0)
    assert max_err(strict, x) <= strict.abs_bound < max_err(relaxed, x)
    assert strict.options.get("strict", 1) == 1 and relaxed.options["strict"] == 0
    assert relaxed.ratio >= strict.ratio * 0.999
    assert compressed_nbytes(x, codec, "abs", 0.02) == strict.nbytes


def test_szp_and_sz3_patches_are_the_violators_with_their_exact_values():
    x = wide()
    for codec in ("szp", "sz3"):
        blob = encode(x, codec, "abs", 0.02)
        count = blob.meta["patches"]
        assert count > 0
        section = payload_tensor(blob.payload)[-patches.section_nbytes(count, 2):]
        idx, vals = patches.unpack(section, count, torch.bfloat16, x.numel())
        assert torch.equal(vals.view(torch.int16), x[idx].view(torch.int16))
        relaxed = decode(encode(x, codec, "abs", 0.02, strict=0))
        miss = (relaxed.double() - x.double()).abs() > blob.abs_bound
        assert set(idx.tolist()) == set(torch.nonzero(miss).reshape(-1).tolist())


def test_spec_labels_do_not_change_and_relaxed_is_spelled_out():
    assert StorageSpec.parse("szp:meanabs:0.5").describe() == "szp:meanabs:0.5,variant=fixed"
    assert StorageSpec.parse("sz3:meanabs:0.5,strict=0").describe() == \
        "sz3:meanabs:0.5,predictor=nopred,strict=0"
    assert StorageSpec.parse("ans:abs:0.001,strict=1").describe() == "ans:abs:0.001"


@pytest.mark.parametrize("codec", ["szp", "sz3"])
def test_format_1_blobs_still_decode(codec):
    x = wide(3000)
    relaxed = encode(x, codec, "abs", 0.02, strict=0)
    meta = {k: v for k, v in relaxed.meta.items() if k in ("stream_nbytes", "sz_shape")}
    old = Blob(codec, 1, relaxed.dtype, relaxed.shape, relaxed.mode, relaxed.level,
               relaxed.abs_bound, {k: v for k, v in relaxed.options.items() if k != "strict"},
               False, None, meta, relaxed.payload)
    assert torch.equal(decode(Blob.from_bytes(old.to_bytes())), decode(relaxed))


@pytest.mark.parametrize("codec", CODECS)
def test_runtime_in_place_decode_applies_the_patches(codec):
    from profiles.runtime.device_decode import decode_payload

    x = wide(5000, seed=2)
    blob = encode(x, codec, "abs", 0.02)
    got = decode_payload(blob, payload_tensor(blob.payload), torch.device("cpu"))
    assert torch.equal(got.view(torch.int16), decode(blob).view(torch.int16))


@pytest.mark.parametrize("codec", CODECS)
def test_corrupt_patch_sections_are_refused(codec):
    x = wide(5000, seed=3)
    blob = encode(x, codec, "abs", 0.02)
    count = blob.meta["patches"]
    for bad_meta in ({"patches": count + 1}, {"patches": -1}):
        bad = Blob(blob.codec, blob.codec_version, blob.dtype, blob.shape, blob.mode, blob.level,
                   blob.abs_bound, blob.options, False, None, {**blob.meta, **bad_meta},
                   blob.payload)
        with pytest.raises(CodecError, match="corrupt|malformed|expected"):
            decode(bad)
    if count:                                        # an index past the end
        payload = blob.payload.copy()
        at = payload.size - patches.section_nbytes(count, 2)
        payload[at:at + 4] = np.frombuffer(np.uint32(10 ** 6).tobytes(), np.uint8)
        bad = Blob(blob.codec, blob.codec_version, blob.dtype, blob.shape, blob.mode, blob.level,
                   blob.abs_bound, blob.options, False, None, blob.meta, payload)
        with pytest.raises(CodecError, match="past the tensor"):
            decode(bad)
