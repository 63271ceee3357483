"""Triton dequantization of `nf4` payloads: one launch, each program decodes a tile of values.

Value i rebuilds its block's absmax (with double quantization DYNAMIC[qa] * absmax2 + offset,
rounded step by step as `nf4.block_absmax` does) and writes NF4[code] * absmax, the code in the
high nibble for even i. Checked bit for bit against `nf4.decode` under `TRITON_INTERPRET=1`
(tests/profiles/test_codecs_formats_triton.py).
"""

from __future__ import annotations

import torch

from profiles.codecs import triton_util
from profiles.codecs.nf4 import DQ_BLOCK, NF4, dynamic_map, num_blocks
from profiles.codecs.quantized import view_as

TILE = 1024

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is only defined where triton is installed
    triton = None

if triton is not None:
    @triton.jit(do_not_specialize=["n"])
    def _nf4_kernel(absmax_ptr, offset_ptr, amax2_ptr, qa_ptr, dyn_ptr, code_ptr, lv_ptr, out_ptr,
                    n, DQ: tl.constexpr, DQB: tl.constexpr, TILE: tl.constexpr,
                    CLAMP: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        inside = offs < n
        b = offs // 64
        if DQ:
            qa = tl.load(qa_ptr + b, mask=inside, other=0).to(tl.int32)
            scaled = tl.load(dyn_ptr + qa, mask=inside, other=0.0) * \
                tl.load(amax2_ptr + b // DQB, mask=inside, other=0.0)
            a = scaled + tl.load(offset_ptr)
        else:
            a = tl.load(absmax_ptr + b, mask=inside, other=0.0)
        byte = tl.load(code_ptr + offs // 2, mask=inside, other=0).to(tl.int32)
        code = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
        x = tl.load(lv_ptr + code, mask=inside, other=0.0) * a
        if CLAMP:
            x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=inside)


def decode(payload: torch.Tensor, n: int, out_dtype: torch.dtype = torch.float32,
           dq: bool = True) -> torch.Tensor:
    """n values of `out_dtype` from an `nf4` payload (uint8 tensor on a CUDA device, or on the
    CPU under TRITON_INTERPRET=1), equal to `cast_back(nf4.decode(...))`."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'moesz[gpu]')")
    dev = payload.device
    kdt = triton_util.kernel_dtype(out_dtype)
    out = torch.empty(n, dtype=kdt, device=dev)
    if n == 0:
        return out.to(out_dtype)
    b = num_blocks(n)
    if dq:
        c = -(-b // DQ_BLOCK)
        offset = view_as(payload, 0, 1, torch.float32)
        amax2 = view_as(payload, 4, c, torch.float32)
        qa = payload[4 + 4 * c:4 + 4 * c + b]
        codes = payload[4 + 4 * c + b:]
        absmax = offset                      # unused
    else:
        absmax = view_as(payload, 0, b, torch.float32)
        codes = payload[4 * b:]
        offset = amax2 = absmax              # unused
        qa = codes
    levels = torch.tensor(NF4, dtype=torch.float32, device=dev)
    _nf4_kernel[(triton.cdiv(n, TILE),)](absmax, offset, amax2, qa, dynamic_map().to(dev), codes,
                                         levels, out, n, DQ=dq, DQB=DQ_BLOCK, TILE=TILE,
                                         CLAMP=kdt == torch.float16, **triton_util.launch_opts())
    return triton_util.finish(out, out_dtype)


__all__ = ["decode"]
