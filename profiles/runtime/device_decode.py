"""Decode an expert's blobs from payload bytes that are already on the device.

`profiles.codecs.decode` takes a blob whose payload is a host (numpy) array and copies it itself;
the runtime instead copies a whole expert record once, on its own stream, and decodes each payload
in place. This module does that for the codecs with a device decoder — `raw` (a view), `rtn8`
and `rtn4` (unpack and scale), the quantized formats `gq`, `nf4`, `mxfp4` and the GGUF types, `szp`
(the fused Triton kernel on CUDA, the vectorized torch decoder elsewhere, then the strict bound's
patches, through `profiles.codecs.szp` itself), `ans` (its Triton decoder on CUDA, the numpy
reference elsewhere) and `cuszp` (libcuSZp) — and falls back to `decode(blob, device)` for any
other codec, whose own decoder then copies its payload. Outputs are bit-identical to
`profiles.codecs.decode` of the same blob.
"""

from __future__ import annotations

import torch

from profiles.codecs import decode
from profiles.codecs.dtypes import cast_back, torch_dtype


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


def _own(blob, payload, dtype, device):
    """The codec's own decoder, which accepts a payload tensor already on the device."""
    from profiles.codecs import get_codec

    codec = get_codec(blob.codec)
    if not codec.reads_version(blob.codec_version):
        return decode(blob, device=device)           # raises the version error
    return codec.decode_payload(payload, blob.meta, dtype, blob.shape, blob.abs_bound,
                                blob.options, device)


def _cuszp(blob, payload, dtype, device):
    from profiles.codecs import cuszp

    if device.type != "cuda":
        return decode(blob, device=device)
    x32 = cuszp.decompress(payload, blob.numel, blob.abs_bound, blob.options["variant"])
    return cast_back(x32, blob.dtype)


# rtn and the quantized formats (gq, nf4, mxfp4, GGUF types): unpacking codes and scaling runs on
# the device, like szp (their Triton kernel on CUDA, their torch decoder elsewhere)
_DEVICE_DECODERS = {"raw": _raw, "szp": _own, "cuszp": _cuszp, "rtn8": _own, "rtn4": _own,
                    "ans": _own}
_DEVICE_DECODERS.update({name: _own for name in ("gq", "nf4", "mxfp4", "q2_k", "q3_k", "q4_k",
                                                 "q5_k", "q6_k", "q8_0")})


def decodes_in_place(codec: str) -> bool:
    """Whether `codec` payloads are decoded from the runtime's own device copy."""
    return codec in _DEVICE_DECODERS
