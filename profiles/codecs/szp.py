"""`szp`: moesz's implementation of the cuSZp v3 stream (fixed and plain modes), CPU and GPU.

Encoding and decoding run where the tensor is: on CUDA with the fused Triton kernels when Triton is
installed (one launch per direction), otherwise with the vectorized torch implementation; both
write streams byte-identical to the numpy reference in `szp_reference`, which follows cuSZp's
kernels. The payload is the cuSZp stream followed by moesz's chunk index (one uint32 per 32768
values, about 0.01 % of a bf16 tensor), which lets the GPU decoder skip the prefix sum.
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs import szp_reference, szp_torch
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
    description = "cuSZp v3 stream (moesz implementation); variant fixed|plain"
    option_spec = {"variant": ("fixed", VARIANTS)}

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
        payload = np.concatenate([stream_np, index_np.view(np.uint8)])
        return Encoded(payload=payload, meta={"stream_nbytes": int(stream_np.size)})

    def payload_size(self, x, abs_bound, options):
        s = szp_torch.stream_nbytes(x, abs_bound, options["variant"])
        return s + 4 * num_chunks(x.numel()), {"stream_nbytes": s}

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        n = int(np.prod(shape, dtype=np.int64))
        s = int(meta["stream_nbytes"])
        k = num_chunks(n)
        if payload.size != s + 4 * k:
            raise CodecError(f"szp blob: payload of {payload.size} bytes, expected {s + 4 * k} for "
                             f"{n} values; the blob is corrupt")
        t = payload_tensor(payload).to(device)
        name = dtype_name(dtype)
        try:
            if use_triton(device):
                from profiles.codecs import szp_triton

                index = t[s:].view(torch.int32).to(torch.int64)
                return szp_triton.decode(t[:s], index, n, abs_bound, options["variant"], dtype)
            out = torch.empty(n, dtype=dtype, device=device)
            return szp_torch.decode(t[:s], n, abs_bound, options["variant"], out=out,
                                    finish=lambda piece: cast_back(piece, name))
        except ValueError as exc:
            raise CodecError(f"szp blob: {exc}; the blob is corrupt") from None
