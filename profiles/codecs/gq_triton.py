"""Triton dequantization of `gq` payloads: one launch, each program decodes a tile of values.

Value i reads its group's fp16 scale and zero and its code from bit i*bits of the stream (two bytes
loaded, so 3-bit codes may straddle a byte), and writes (q - z) * s in fp32 arithmetic without
fused multiply-add, straight in the output dtype on a GPU. Checked bit for bit against `gq.decode`
under `TRITON_INTERPRET=1` (tests/profiles/test_codecs_formats_triton.py).
"""

from __future__ import annotations

import torch

from profiles.codecs import triton_util
from profiles.codecs.gq import num_groups
from profiles.codecs.quantized import view_as

TILE = 1024

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is only defined where triton is installed
    triton = None

if triton is not None:
    @triton.jit(do_not_specialize=["n", "ncode"])
    def _gq_kernel(scale_ptr, zero_ptr, code_ptr, out_ptr, n, ncode,
                   BITS: tl.constexpr, GROUP: tl.constexpr, TILE: tl.constexpr,
                   CLAMP: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        inside = offs < n
        g = offs // GROUP
        s = tl.load(scale_ptr + g, mask=inside, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g, mask=inside, other=0.0).to(tl.float32)
        pos = offs * BITS
        byte = pos >> 3
        lo = tl.load(code_ptr + byte, mask=inside, other=0).to(tl.int32)
        hi = tl.load(code_ptr + byte + 1, mask=inside & (byte + 1 < ncode), other=0).to(tl.int32)
        q = ((lo | (hi << 8)) >> (pos & 7).to(tl.int32)) & ((1 << BITS) - 1)
        x = (q.to(tl.float32) - z) * s
        if CLAMP:
            x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=inside)


def decode(payload: torch.Tensor, n: int, out_dtype: torch.dtype = torch.float32,
           bits: int = 4, group: int = 64) -> torch.Tensor:
    """n values of `out_dtype` from a `gq` payload (uint8 tensor on a CUDA device, or on the CPU
    under TRITON_INTERPRET=1), equal to `cast_back(gq.decode(...))`."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'moesz[gpu]')")
    g = num_groups(n, group)
    kdt = triton_util.kernel_dtype(out_dtype)
    out = torch.empty(n, dtype=kdt, device=payload.device)
    if n == 0:
        return out.to(out_dtype)
    scales = view_as(payload, 0, g, torch.float16)
    zeros = view_as(payload, 2 * g, g, torch.float16)
    codes = payload[4 * g:]
    _gq_kernel[(triton.cdiv(n, TILE),)](scales, zeros, codes, out, n, codes.numel(),
                                        BITS=bits, GROUP=group, TILE=TILE,
                                        CLAMP=kdt == torch.float16, **triton_util.launch_opts())
    return triton_util.finish(out, out_dtype)


__all__ = ["decode"]
