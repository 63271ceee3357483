"""`szp`: moesz's implementation of the cuSZp v3 stream (fixed and plain modes), CPU and GPU.

Encoding and decoding run where the tensor is: on CUDA with the fused Triton kernels when Triton is
installed (one launch per direction), otherwise with the vectorized torch implementation; both
write streams byte-identical to the numpy reference in `szp_reference`, which follows cuSZp's
kernels. The payload is the cuSZp stream followed by moesz's chunk index (one uint32 per 32768
values, about 0.01 % of a bf16 tensor), which lets the GPU decoder skip the prefix sum.

Strict bound (the default; `strict=0` for the relaxed one): the encoder rounds each reconstruction
to the original dtype exactly as the decoders do and appends the values that miss the bound as
patches (`profiles.codecs.patches`: uint32 indices, then the original values), which every decode
path applies with one scatter after the bulk decode. The cuSZp stream itself is the same in both
modes. Payload format 2 (format 1, written before patches existed, still decodes).
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs import patches, szp_reference, szp_torch
from profiles.codecs.dtypes import cast_back, dtype_name
from profiles.codecs.registry import Codec, Encoded, payload_tensor
from profiles.codecs.szp_reference import SATURATION_LIMIT, VARIANTS, num_chunks
from profiles.errors import CodecError


def saturation_reason(max_abs: float, abs_bound: float) -> str | None:
    """Why int32 quantization codes could overflow for this bound, or None when they cannot."""
    codes = max_abs * float(szp_reference.recip_precision(abs_bound))
    if codes >= SATURATION_LIMIT:
        return (f"max |x| / (2 * bound) = {codes:.3g} reaches 2^30, where the int32 codes of the "
                f"cuSZp format would saturate")
    return None


def use_triton(device: torch.device) -> bool:
    """Triton kernels on CUDA devices when installed (imported only then: triton is slow to load)."""
    if device.type != "cuda":
        return False
    from profiles.codecs import szp_triton

    return szp_triton.available()[0]


class SzpCodec(Codec):
    """cuSZp v3 format, fixed (default) or plain mode; runs on CPU and CUDA."""

    name = "szp"
    error_bounded = True
    gpu_decodable = True
    cpu_only = False
    description = "cuSZp v3 stream (moesz implementation); variant fixed|plain, strict 1|0"
    format_version = 2
    older_versions = (1,)
    option_spec = {"variant": ("fixed", VARIANTS), **patches.STRICT_OPTION}
    implicit_options = frozenset({"strict"})

    def saturation_reason(self, max_abs, abs_bound):
        return saturation_reason(max_abs, abs_bound)

    def encode_payload(self, x, abs_bound, options):
        variant = options["variant"]
        if use_triton(x.device):
            from profiles.codecs import szp_triton

            stream, index = szp_triton.encode(x, abs_bound, variant)
        else:
            stream, index = szp_torch.encode(x, abs_bound, variant)
        stream_np = stream.cpu().numpy()
        index_np = index.to(torch.int64).cpu().numpy().astype("<u4")
        idx = strict_violators(x, abs_bound, options)
        payload = np.concatenate([stream_np, index_np.view(np.uint8), patches.pack(idx, x)])
        return Encoded(payload=payload, meta={"stream_nbytes": int(stream_np.size),
                                              "patches": int(idx.numel())})

    def payload_size(self, x, abs_bound, options):
        s = szp_torch.stream_nbytes(x, abs_bound, options["variant"])
        count = int(strict_violators(x, abs_bound, options).numel())
        size = s + 4 * num_chunks(x.numel()) + patches.section_nbytes(count, x.element_size())
        return size, {"stream_nbytes": s, "patches": count}

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        n = int(np.prod(shape, dtype=np.int64))
        t = payload if isinstance(payload, torch.Tensor) else payload_tensor(payload)
        stream, index, patch = split(t, meta, n, dtype)
        stream, index = stream.to(device), index.to(device)
        name = dtype_name(dtype)
        try:
            if use_triton(device):
                from profiles.codecs import szp_triton

                out = szp_triton.decode(stream, index.view(torch.int32).to(torch.int64), n,
                                        abs_bound, options["variant"], dtype)
            else:
                out = szp_torch.decode(stream, n, abs_bound, options["variant"],
                                       out=torch.empty(n, dtype=dtype, device=device),
                                       finish=lambda piece: cast_back(piece, name))
        except ValueError as exc:
            raise CodecError(f"szp blob: {exc}; the blob is corrupt") from None
        idx, vals = patches.unpack(patch.to(device), int(meta.get("patches", 0)), dtype, n)
        return patches.apply(out, idx, vals)


def split(payload: torch.Tensor, meta: dict, n: int,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stream, chunk index, patch section) of an szp payload (uint8 tensor, any device).

    Raises:
        CodecError: the payload length does not match the meta.
    """
    try:
        s, count = int(meta["stream_nbytes"]), int(meta.get("patches", 0))
    except (KeyError, TypeError, ValueError):
        raise CodecError(f"szp blob: meta {meta} is malformed; the blob is corrupt") from None
    k = num_chunks(n)
    p = patches.section_nbytes(count, torch.empty((), dtype=dtype).element_size())
    if payload.numel() != s + 4 * k + p:
        raise CodecError(f"szp blob: payload of {payload.numel()} bytes, expected {s + 4 * k + p} "
                         f"for {n} values; the blob is corrupt")
    return payload[:s], payload[s:s + 4 * k], payload[s + 4 * k:]


def reconstruct(piece: torch.Tensor, abs_bound: float) -> torch.Tensor:
    """What every szp decoder returns for a piece of values: (q·eb)·2 in fp32, rounded back."""
    q = szp_torch.quantize(piece.to(torch.float32), abs_bound)
    return cast_back(szp_torch.dequantize(q, abs_bound), dtype_name(piece.dtype))


def strict_violators(x: torch.Tensor, abs_bound: float, options: dict) -> torch.Tensor:
    """Flat indices where the rounded reconstruction misses the bound (none when relaxed)."""
    if not patches.is_strict(options) or x.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    return patches.violators(x, lambda lo, piece: reconstruct(piece, abs_bound), abs_bound)
