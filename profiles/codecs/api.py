"""encode / decode / roundtrip: the one entry point every codec is used through.

`encode` validates the request, resolves the bound mode to one absolute bound (rounded down to
fp32), checks for NaN/Inf and int32 saturation, falls back to lossless storage when the bound
cannot be applied, calls the codec, and wraps the result in a self-describing `Blob`.
"""

from __future__ import annotations

from typing import Any

import torch

from profiles.codecs import bounds
from profiles.codecs.blob import Blob
from profiles.codecs.dtypes import as_torch, cast_back, dtype_name, torch_dtype
from profiles.codecs.registry import Codec, Encoded, get_codec
from profiles.errors import CodecError


def _prepare(tensor, codec: str, mode: str | None, level, options: dict[str, Any]):
    c = get_codec(codec)
    opts = c.check_options(options)
    ok, why = c.availability()
    if not ok:
        raise CodecError(f"codec {codec!r} is not available here: {why}")
    x = as_torch(tensor)
    if not c.error_bounded:
        bounds.tensor_stats(x)                                  # NaN/Inf check only
        return c, opts, x, None, None, None, None
    mode, level = bounds.check_request(mode, level)
    stats = bounds.tensor_stats(x, mode)
    abs_bound = bounds.floor_f32(bounds.resolve(mode, level, stats))
    reason = None
    if x.numel():
        reason = (bounds.lossless_reason(abs_bound, mode, level)
                  or c.saturation_reason(stats.max_abs, abs_bound))
    return c, opts, x, mode, level, abs_bound, reason


def encode(tensor, codec: str = "szp", mode: str | None = "meanabs", level: float | None = 0.5,
           **options) -> Blob:
    """Compress one tensor under an error bound into a self-describing blob.

    Args:
        tensor: torch tensor (CPU or CUDA) or numpy array; bf16, fp16, fp32 or fp8 e4m3; any
            shape, contiguous or not.
        codec: a name from `list_codecs()` (`szp`, `sz3`, `cuszp`, `lossless`, `rtn8`, `rtn4`,
            `raw`, `ans`).
        mode: bound mode, one of `BOUND_MODES`; ignored by codecs that are not error-bounded.
        level: bound value in that mode (> 0); ignored by codecs that are not error-bounded.
        **options: codec options (`predictor=` for sz3, `variant=` for szp/cuszp; `strict=0` for
            the relaxed bound of sz3, szp and ans).

    Returns:
        The blob. `blob.abs_bound` is the absolute bound applied (fp32 value); a bound that
        resolves to 0 or would saturate the int32 codes gives a lossless payload with
        `lossless_fallback=True` and `abs_bound=0.0`.

    Raises:
        CodecError: unknown codec or option, unavailable codec, unsupported dtype, NaN/Inf values.
        BoundError: unknown mode, level <= 0, NaN or infinite.
    """
    c, opts, x, mode, level, abs_bound, reason = _prepare(tensor, codec, mode, level, options)
    if reason is not None:
        enc = get_codec("lossless").encode_payload(x, None, {"zstd_level": 3})
        return _blob(c, x, mode, level, 0.0, opts, enc, reason)
    enc = c.encode_payload(x, abs_bound, opts)
    applied = enc.abs_bound if enc.abs_bound is not None else abs_bound
    return _blob(c, x, mode, level, applied, opts, enc, None)


def _blob(c: Codec, x: torch.Tensor, mode, level, abs_bound, opts, enc: Encoded,
          reason: str | None) -> Blob:
    return Blob(codec=c.name, codec_version=c.format_version, dtype=dtype_name(x.dtype),
                shape=tuple(x.shape), mode=mode, level=level, abs_bound=abs_bound,
                options=opts, lossless_fallback=reason is not None, fallback_reason=reason,
                meta=enc.meta, payload=enc.payload)


def decode(blob: Blob, device: str | torch.device = "cpu") -> torch.Tensor:
    """Decompress a blob to a tensor of its original dtype and shape on `device`.

    Raises:
        CodecError: unknown codec or codec version, a CUDA device without CUDA, a corrupt payload.
    """
    c = get_codec(blob.codec)
    if not c.reads_version(blob.codec_version):
        raise CodecError(f"blob of codec {blob.codec!r} has format version {blob.codec_version}; "
                         f"this moesz reads version {c.format_version}; re-encode it")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CodecError(f"device {device!r} requested but no CUDA GPU is visible; use device='cpu'")
    dtype = torch_dtype(blob.dtype)
    if blob.lossless_fallback:
        out = get_codec("lossless").decode_payload(blob.payload, blob.meta, dtype, blob.shape,
                                                    None, {}, torch.device("cpu")).to(dev)
    else:
        ok, why = c.availability()
        if not ok:
            raise CodecError(f"codec {blob.codec!r} cannot decode here: {why}")
        out = c.decode_payload(blob.payload, blob.meta, dtype, blob.shape, blob.abs_bound,
                               blob.options, dev)
    if out.dtype != dtype:
        out = cast_back(out.to(torch.float32), blob.dtype)
    if out.numel() != blob.numel:
        raise CodecError(f"blob of codec {blob.codec!r} decoded to {out.numel()} values, its header "
                         f"says {blob.numel}; the blob is corrupt")
    return out.reshape(blob.shape)


def roundtrip(tensor, codec: str = "szp", mode: str | None = "meanabs",
              level: float | None = 0.5, **options) -> tuple[torch.Tensor, Blob]:
    """Encode and decode in one call, decoding on the tensor's own device.

    Returns:
        (decoded tensor of the original dtype/shape, the blob); no serialization in between.
    """
    blob = encode(tensor, codec, mode, level, **options)
    device = tensor.device if isinstance(tensor, torch.Tensor) else "cpu"
    return decode(blob, device=device), blob


def compressed_nbytes(tensor, codec: str = "szp", mode: str | None = "meanabs",
                      level: float | None = 0.5, **options) -> int:
    """Exactly `encode(...).nbytes`, computed without packing bits where the codec allows (szp)."""
    c, opts, x, mode, level, abs_bound, reason = _prepare(tensor, codec, mode, level, options)
    sized = None if reason is not None else c.payload_size(x, abs_bound, opts)
    if sized is None:
        return encode(tensor, codec, mode, level, **options).nbytes
    payload_nbytes, meta = sized
    probe = _blob(c, x, mode, level, abs_bound, opts, Encoded(payload=_EMPTY, meta=meta), None)
    return probe.header_nbytes + payload_nbytes


_EMPTY = torch.zeros(0, dtype=torch.uint8).numpy()
__all__ = ["encode", "decode", "roundtrip", "compressed_nbytes"]
