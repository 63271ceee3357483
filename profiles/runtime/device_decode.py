"""Decode an expert's blobs from payload bytes that are already on the device.

`profiles.codecs.decode` takes a blob whose payload is a host (numpy) array and copies it itself;
the runtime instead copies a whole expert record once, on its own stream, and decodes each payload
in place. This module does that for the codecs with a device decoder — `raw` (a view), `rtn8`
and `rtn4` (unpack and scale), the quantized formats `gq`, `nf4`, `mxfp4` and the GGUF types, `szp`
(the fused Triton kernel on CUDA, the vectorized torch decoder elsewhere, exactly as
`profiles.codecs.szp` does) and `cuszp` (libcuSZp) — and falls back to `decode(blob, device)` for
any other codec, whose own decoder then copies its payload. Outputs are bit-identical to
`profiles.codecs.decode` of the same blob.
"""

from __future__ import annotations

import torch

from profiles.codecs import decode
from profiles.codecs.dtypes import cast_back, torch_dtype
from profiles.errors import CodecError


def decode_payload(blob, payload: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """One tensor of the original dtype and shape on `device`.

    Args:
        blob: the parsed `profiles.codecs.Blob` (its header drives decoding).
        payload: the blob's payload bytes (uint8, on `device`, 4-byte aligned), or None to decode
            from the blob's host payload.
        device: where the result goes.

    Raises:
        CodecError: a corrupt payload.
    """
    if payload is None or blob.lossless_fallback or blob.codec not in _DEVICE_DECODERS:
        return decode(blob, device=device)
    dtype = torch_dtype(blob.dtype)
    if blob.numel == 0:
        return torch.empty(blob.shape, dtype=dtype, device=device)
    return _DEVICE_DECODERS[blob.codec](blob, payload, dtype, device).reshape(blob.shape)


def _raw(blob, payload, dtype, device):
    return payload.view(dtype)


def _szp(blob, payload, dtype, device):
    from profiles.codecs import szp_torch, szp_triton
    from profiles.codecs.szp import use_triton
    from profiles.codecs.szp_reference import num_chunks

    n, s = blob.numel, int(blob.meta["stream_nbytes"])
    if payload.numel() != s + 4 * num_chunks(n):
        raise CodecError(f"szp blob: payload of {payload.numel()} bytes, expected "
                         f"{s + 4 * num_chunks(n)} for {n} values; the blob is corrupt")
    variant = blob.options["variant"]
    try:
        if use_triton(device):
            index = payload[s:].view(torch.int32).to(torch.int64)
            return szp_triton.decode(payload[:s], index, n, blob.abs_bound, variant, dtype)
        out = torch.empty(n, dtype=dtype, device=device)
        return szp_torch.decode(payload[:s], n, blob.abs_bound, variant, out=out,
                                finish=lambda piece: cast_back(piece, blob.dtype))
    except ValueError as exc:
        raise CodecError(f"szp blob: {exc}; the blob is corrupt") from None


def _cuszp(blob, payload, dtype, device):
    from profiles.codecs import cuszp

    if device.type != "cuda":
        return decode(blob, device=device)
    x32 = cuszp.decompress(payload, blob.numel, blob.abs_bound, blob.options["variant"])
    return cast_back(x32, blob.dtype)


def _rtn(blob, payload, dtype, device):
    from profiles.codecs import get_codec

    # unpacking int8/int4 codes and scaling by per-row absmax runs on the device, like szp; the
    # quantized formats (gq, nf4, mxfp4, GGUF types) decode a device payload the same way (their
    # Triton kernel on CUDA, their torch decoder elsewhere)
    return get_codec(blob.codec).decode_payload(payload, blob.meta, dtype, blob.shape,
                                                blob.abs_bound, blob.options, device)


_DEVICE_DECODERS = {"raw": _raw, "szp": _szp, "cuszp": _cuszp, "rtn8": _rtn, "rtn4": _rtn}
_DEVICE_DECODERS.update({name: _rtn for name in ("gq", "nf4", "mxfp4", "q2_k", "q3_k", "q4_k",
                                                 "q5_k", "q6_k", "q8_0")})


def decodes_in_place(codec: str) -> bool:
    """Whether `codec` payloads are decoded from the runtime's own device copy."""
    return codec in _DEVICE_DECODERS
