"""Triton dequantization of `mxfp4` payloads: one launch, each program decodes a tile of values.

Value i of block b reads the block's exponent byte E and its nibble (low nibble of byte i mod 16
for the first 16 values, high nibble for the rest), and writes KVALUES[code] * X/2 with X/2 built
from E's bits exactly as `mxfp4.e8m0_half` does. Checked bit for bit against `mxfp4.decode` under
`TRITON_INTERPRET=1` (tests/profiles/test_codecs_formats_triton.py).
"""

from __future__ import annotations

import torch

from profiles.codecs import triton_util
from profiles.codecs.mxfp4 import BLOCK_NBYTES, KVALUES

TILE = 1024

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is only defined where triton is installed
    triton = None

if triton is not None:
    @triton.jit(do_not_specialize=["n"])
    def _mxfp4_kernel(p_ptr, kv_ptr, out_ptr, n, TILE: tl.constexpr, CLAMP: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        inside = offs < n
        base = (offs // 32) * 17
        j = offs % 32
        e = tl.load(p_ptr + base, mask=inside, other=0).to(tl.int32)
        byte = tl.load(p_ptr + base + 1 + (j % 16), mask=inside, other=0).to(tl.int32)
        code = tl.where(j < 16, byte & 15, byte >> 4)
        bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
        d = bits.to(tl.float32, bitcast=True)
        k = tl.load(kv_ptr + code, mask=inside, other=0.0)
        x = d * k
        if CLAMP:
            x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=inside)


def decode(payload: torch.Tensor, n: int, out_dtype: torch.dtype = torch.float32,
           scale: str = "ocp") -> torch.Tensor:
    """n values of `out_dtype` from an `mxfp4` payload (uint8 tensor on a CUDA device, or on the
    CPU under TRITON_INTERPRET=1), equal to `cast_back(mxfp4.decode(...))`."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'moesz[gpu]')")
    assert payload.numel() % BLOCK_NBYTES == 0
    kdt = triton_util.kernel_dtype(out_dtype)
    out = torch.empty(n, dtype=kdt, device=payload.device)
    if n == 0:
        return out.to(out_dtype)
    kv = torch.tensor(KVALUES, dtype=torch.float32, device=payload.device)
    _mxfp4_kernel[(triton.cdiv(n, TILE),)](payload, kv, out, n, TILE=TILE,
                                           CLAMP=kdt == torch.float16, **triton_util.launch_opts())
    return triton_util.finish(out, out_dtype)


__all__ = ["decode"]
