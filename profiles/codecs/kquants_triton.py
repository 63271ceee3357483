"""Triton dequantization of the GGUF k-quants and Q8_0: one launch, each program a tile of values.

Value j of a block reads only the bytes it needs (its sub-block's scale, its bit fields, the fp16
d/dmin rebuilt from two bytes) and computes the value with the same fp32 operations in the same
order as `kquants.decode` (itself equal to `gguf.quants.dequantize`), without fused multiply-add.
Checked bit for bit against `kquants.decode` under `TRITON_INTERPRET=1`
(tests/profiles/test_codecs_formats_triton.py).
"""

from __future__ import annotations

import torch

from profiles.codecs import triton_util
from profiles.codecs.kquants import TYPES

TILE = 1024
_CODES = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6, "q8_0": 8}

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is only defined where triton is installed
    triton = None

if triton is not None:
    @triton.jit
    def _u8(p_ptr, off, mask):
        return tl.load(p_ptr + off, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _f16(p_ptr, off, mask):
        bits = _u8(p_ptr, off, mask) | (_u8(p_ptr, off + 1, mask) << 8)
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _scale_min_k4(p_ptr, base, sub, mask):
        # get_scale_min_k4 over the 12 scale bytes at base + 4
        lo = sub < 4
        s_lo = _u8(p_ptr, base + 4 + sub % 4, mask)            # d_[sub] or d_[sub - 4]
        s_mid = _u8(p_ptr, base + 8 + sub % 4, mask)           # m_[sub] or m_[sub - 4]
        s_hi = _u8(p_ptr, base + 12 + sub % 4, mask)           # m_d[sub - 4]
        sc = tl.where(lo, s_lo & 63, (s_hi & 0xF) | ((s_lo >> 2) & 0x30))
        m = tl.where(lo, s_mid & 63, (s_hi >> 4) | ((s_mid >> 2) & 0x30))
        return sc, m

    @triton.jit(do_not_specialize=["n"])
    def _kquant_kernel(p_ptr, out_ptr, n, QTYPE: tl.constexpr, TILE: tl.constexpr,
                       CLAMP: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        inside = offs < n
        if QTYPE == 8:
            base = (offs // 32) * 34
            j = offs % 32
            q = tl.load(p_ptr + base + 2 + j, mask=inside, other=0).to(tl.int8, bitcast=True)
            x = q.to(tl.float32) * _f16(p_ptr, base, inside)
        else:
            j = offs % 256
            c = j // 128
            r = j % 128
            k = r // 32
            l = j % 32
            if QTYPE == 2:
                base = (offs // 256) * 84
                sc = _u8(p_ptr, base + j // 16, inside)
                q = (_u8(p_ptr, base + 16 + 32 * c + l, inside) >> (2 * k).to(tl.int32)) & 3
                dl = _f16(p_ptr, base + 80, inside) * (sc & 0xF).to(tl.float32)
                ml = _f16(p_ptr, base + 82, inside) * (sc >> 4).to(tl.float32)
                x = dl * q.to(tl.float32) - ml
            elif QTYPE == 3:
                base = (offs // 256) * 110
                s = j // 16
                lsc = _u8(p_ptr, base + 96 + s % 8, inside) >> (4 * (s // 8)).to(tl.int32)
                hsc = _u8(p_ptr, base + 104 + s % 4, inside) >> (2 * (s // 4)).to(tl.int32)
                scale = ((lsc & 0xF) | ((hsc & 3) << 4)) - 32
                q2 = (_u8(p_ptr, base + 32 + 32 * c + l, inside) >> (2 * k).to(tl.int32)) & 3
                hbit = (_u8(p_ptr, base + l, inside) >> (j // 32).to(tl.int32)) & 1
                q = q2 - ((hbit ^ 1) << 2)
                dl = _f16(p_ptr, base + 108, inside) * scale.to(tl.float32)
                x = dl * q.to(tl.float32)
            elif QTYPE == 4 or QTYPE == 5:
                nbytes = 144 if QTYPE == 4 else 176
                qs_at = 16 if QTYPE == 4 else 48
                base = (offs // 256) * nbytes
                sub = j // 32
                sc, m = _scale_min_k4(p_ptr, base, sub, inside)
                h = (j % 64) // 32
                q = _u8(p_ptr, base + qs_at + 32 * (j // 64) + l, inside)
                q = (q >> (4 * h).to(tl.int32)) & 0xF
                if QTYPE == 5:
                    q = q | (((_u8(p_ptr, base + 16 + l, inside) >> sub.to(tl.int32)) & 1) << 4)
                dl = _f16(p_ptr, base, inside) * sc.to(tl.float32)
                ml = _f16(p_ptr, base + 2, inside) * m.to(tl.float32)
                x = dl * q.to(tl.float32) - ml
            else:
                base = (offs // 256) * 210
                lo = _u8(p_ptr, base + 64 * c + (k % 2) * 32 + l, inside)
                lo = lo >> (4 * (k // 2)).to(tl.int32)
                hi = _u8(p_ptr, base + 128 + 32 * c + l, inside) >> (2 * k).to(tl.int32)
                q = ((lo & 0xF) | ((hi & 3) << 4)) - 32
                sc = tl.load(p_ptr + base + 192 + j // 16, mask=inside, other=0)
                sc = sc.to(tl.int8, bitcast=True)
                dl = _f16(p_ptr, base + 208, inside) * sc.to(tl.float32)
                x = dl * q.to(tl.float32)
        if CLAMP:
            x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=inside)


def decode(payload: torch.Tensor, n: int, out_dtype: torch.dtype = torch.float32,
           qtype: str = "q4_k") -> torch.Tensor:
    """n values of `out_dtype` from a GGUF-type payload (uint8 tensor on a CUDA device, or on the
    CPU under TRITON_INTERPRET=1), equal to `cast_back(kquants.decode(...))`."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'moesz[gpu]')")
    assert payload.numel() % TYPES[qtype][1] == 0
    kdt = triton_util.kernel_dtype(out_dtype)
    out = torch.empty(n, dtype=kdt, device=payload.device)
    if n == 0:
        return out.to(out_dtype)
    _kquant_kernel[(triton.cdiv(n, TILE),)](payload, out, n, QTYPE=_CODES[qtype], TILE=TILE,
                                            CLAMP=kdt == torch.float16, **triton_util.launch_opts())
    return triton_util.finish(out, out_dtype)


__all__ = ["decode"]
