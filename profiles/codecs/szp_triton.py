"""Fused Triton kernels for the cuSZp v3 stream: one launch to encode, one launch to decode.

Encode: each program quantizes a tile of P blocks (upcasting bf16/fp16/fp8 in registers), computes
block rates, and finds its output offset with a decoupled look-back over the preceding tiles
(Merrill & Garland, "Single-pass Parallel Prefix Scan with Decoupled Look-back", 2016), the scheme
cuSZp's kernels use; tile ids are taken from an atomic counter so that every tile a program waits
on has already started. It writes the rate bytes, sign words, bit planes and the chunk index.

Decode: each program reads its chunk's offset from the index stored next to the stream, adds the
sizes of the blocks before it in that chunk, and writes P blocks of values directly in the
requested output dtype (fused dequantize and cast).

Both kernels are byte-for-byte checked against `szp_reference` (on CPU through
`TRITON_INTERPRET=1`, on a GPU by `benchmarks/gpu_check.py`). Floating-point contraction is
disabled so that d = x * r and d + 0.5 round exactly as the reference's separate operations.
"""

from __future__ import annotations

import torch

from profiles.codecs import triton_util
from profiles.codecs.szp_reference import (BLOCK, CHUNK_BLOCKS, num_blocks, num_chunks,
                                           rate_area_nbytes, recip_precision)

ENCODE_TILE_BLOCKS = 64
DECODE_TILE_BLOCKS = 64


def available() -> tuple[bool, str]:
    """(True, "") if Triton can run here: a CUDA device, or the CPU interpreter when requested."""
    return triton_util.available()


def _interpreting() -> bool:
    return triton_util.interpreting()


try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are only defined where triton is installed
    triton = None


def _kernels():
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'moesz[gpu]')")
    return _encode_kernel, _decode_kernel


if triton is not None:
    @triton.jit
    def _bit_positions():
        # value i of a block -> bit of the little-endian 32-bit word holding its 4 stream bytes
        i = tl.arange(0, 32)
        return (i // 8) * 8 + 7 - (i % 8)

    @triton.jit(do_not_specialize=["n", "nb"])
    def _encode_kernel(x_ptr, out_ptr, words_ptr, index_ptr, state_ptr, counter_ptr,
                      n, nb, area, recip,
                      P: tl.constexpr, PLAIN: tl.constexpr, CHUNK: tl.constexpr):
        tile = tl.atomic_add(counter_ptr, 1)
        b = tile * P + tl.arange(0, P)
        i = tl.arange(0, 32)
        idx = b.to(tl.int64)[:, None] * 32 + i[None, :]
        inside = idx < n
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        d = x * recip
        q = (d + 0.5).to(tl.int32) - (d < -0.5).to(tl.int32)
        if PLAIN:
            first = i[None, :] == 0
            xp = tl.load(x_ptr + idx - 1, mask=inside & (i[None, :] > 0), other=0.0).to(tl.float32)
            dp = xp * recip
            qp = (dp + 0.5).to(tl.int32) - (dp < -0.5).to(tl.int32)
            q = tl.where(first, q, q - qp)
            q = tl.where(inside, q, 0)
        a = tl.abs(q)
        amax = tl.max(a, axis=1)
        r = tl.zeros([P], dtype=tl.int32)
        for k in tl.static_range(31):
            r += ((amax >> k) > 0).to(tl.int32)
        size = tl.where(r > 0, 4 + 4 * r, 0).to(tl.int64)
        excl = tl.cumsum(size, axis=0) - size
        total = tl.sum(size, axis=0)

        # decoupled look-back: state = (value << 2) | flag, flag 1 = tile sum, 2 = inclusive prefix
        prefix = total * 0
        if tile == 0:
            tl.atomic_xchg(state_ptr, (total << 2) | 2)
        else:
            tl.atomic_xchg(state_ptr + tile, (total << 2) | 1)
            j = tile - 1
            while j >= 0:
                s = tl.atomic_add(state_ptr + j, 0)
                f = s & 3
                prefix += tl.where(f != 0, s >> 2, 0)
                j = tl.where(f == 2, -1, tl.where(f == 1, j - 1, j))
            tl.atomic_xchg(state_ptr + tile, ((prefix + total) << 2) | 2)

        valid = b < nb
        tl.store(out_ptr + b, r.to(tl.uint8), mask=valid)
        off = prefix + excl
        tl.store(index_ptr + b // CHUNK, off, mask=valid & (b % CHUNK == 0))
        wbase = (area + off) // 4
        shift = _bit_positions()
        neg = (q < 0).to(tl.uint32)
        sw = tl.sum(neg << shift[None, :].to(tl.uint32), axis=1)
        tl.store(words_ptr + wbase, sw, mask=r > 0)
        rmax = tl.max(r, axis=0)
        au = a.to(tl.uint32)
        for k in range(0, rmax):
            pw = tl.sum(((au >> k) & 1) << shift[None, :].to(tl.uint32), axis=1)
            tl.store(words_ptr + wbase + 1 + k, pw, mask=k < r)

    @triton.jit(do_not_specialize=["n", "nb"])
    def _decode_kernel(stream_ptr, words_ptr, index_ptr, out_ptr, n, nb, area, eb, fmax,
                      P: tl.constexpr, PLAIN: tl.constexpr, CHUNK: tl.constexpr,
                      CLAMP: tl.constexpr, OUT_NARROW: tl.constexpr):
        pid = tl.program_id(0)
        b0 = pid * P
        b = b0 + tl.arange(0, P)
        r = tl.load(stream_ptr + b, mask=b < nb, other=0).to(tl.int32)
        size = tl.where(r > 0, 4 + 4 * r, 0).to(tl.int64)
        chunk_start = (b0 // CHUNK) * CHUNK
        base = tl.load(index_ptr + b0 // CHUNK).to(tl.int64)
        for s0 in range(chunk_start, b0, P):
            rr = tl.load(stream_ptr + s0 + tl.arange(0, P)).to(tl.int32)
            base += tl.sum(tl.where(rr > 0, 4 + 4 * rr, 0).to(tl.int64), axis=0)
        wbase = (area + base + tl.cumsum(size, axis=0) - size) // 4
        shift = _bit_positions().to(tl.uint32)
        sw = tl.load(words_ptr + wbase, mask=r > 0, other=0).to(tl.uint32)
        neg = ((sw[:, None] >> shift[None, :]) & 1) != 0
        a = tl.zeros([P, 32], dtype=tl.uint32)
        rmax = tl.max(r, axis=0)
        for k in range(0, rmax):
            pw = tl.load(words_ptr + wbase + 1 + k, mask=k < r, other=0).to(tl.uint32)
            a |= ((pw[:, None] >> shift[None, :]) & 1) << k
        v = a.to(tl.int32)
        v = tl.where(neg, -v, v)
        if PLAIN:
            v = tl.cumsum(v, axis=1)
        x = (v.to(tl.float32) * eb) * 2.0
        if CLAMP:
            x = tl.minimum(tl.maximum(x, -fmax), fmax)
        idx = b.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :]
        tl.store(out_ptr + idx, x.to(out_ptr.dtype.element_ty)
                 if OUT_NARROW else x, mask=idx < n)


def _launch_opts() -> dict:
    return triton_util.launch_opts()


def encode(x: torch.Tensor, eb: float, variant: str = "fixed",
           max_rate: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress values (fp32/bf16/fp16/fp8, contiguous) with one fused kernel launch.

    Args:
        x: contiguous values on a CUDA device (or CPU under TRITON_INTERPRET=1).
        eb: absolute error bound, an fp32 value > 0.
        variant: "fixed" or "plain".
        max_rate: an upper bound on any block rate, to size the output buffer.

    Returns:
        (stream uint8, chunk index int64) on x's device.
    """
    encode_kernel, _ = _kernels()
    n = x.numel()
    dev = x.device
    nb = num_blocks(n)
    area = rate_area_nbytes(n)
    flat = x.reshape(-1)
    if flat.dtype == torch.float8_e4m3fn:      # Triton loads fp8 bits as uint8; upcast first
        flat = flat.to(torch.float16)
    cap = area + nb * (4 + 4 * max_rate)
    cap += (-cap) % 4
    out = torch.empty(cap, dtype=torch.uint8, device=dev)
    out[:area].zero_()
    index = torch.zeros(num_chunks(n), dtype=torch.int64, device=dev)
    if nb == 0:
        return out[:0], index
    tiles = (nb + ENCODE_TILE_BLOCKS - 1) // ENCODE_TILE_BLOCKS
    state = torch.zeros(tiles, dtype=torch.int64, device=dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    encode_kernel[(tiles,)](flat, out, out.view(torch.int32), index, state, counter,
                            n, nb, area, float(recip_precision(eb)),
                            P=ENCODE_TILE_BLOCKS, PLAIN=(variant == "plain"), CHUNK=CHUNK_BLOCKS,
                            **_launch_opts())
    total = int(state[tiles - 1]) >> 2
    return out[:area + total], index


def decode(stream: torch.Tensor, index: torch.Tensor, n: int, eb: float, variant: str = "fixed",
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decompress with one fused kernel launch, writing `out_dtype` directly.

    Args:
        stream: uint8 stream on the device (4-byte aligned start).
        index: chunk index (int64 or int32) on the device.
        n: number of values.
        eb: the fp32 bound used to encode.
        variant: "fixed" or "plain".
        out_dtype: fp32, bf16 or fp16 (fp8 output is rounded from fp16 afterwards).

    Returns:
        A flat tensor of n values of `out_dtype`.
    """
    _, decode_kernel = _kernels()
    dev = stream.device
    nb = num_blocks(n)
    # fp8 is rounded from fp32 afterwards (rounding through fp16 first could round twice); the
    # CPU interpreter truncates fp32 -> bf16/fp16 instead of rounding, so it casts afterwards too
    narrow_ok = out_dtype in (torch.bfloat16, torch.float16) and not _interpreting()
    kernel_dtype = out_dtype if narrow_ok else torch.float32
    out = torch.empty(n, dtype=kernel_dtype, device=dev)
    if n == 0:
        return out.to(out_dtype)
    clamp = kernel_dtype == torch.float16
    fmax = float(torch.finfo(torch.float16).max)
    if stream.numel() % 4:
        raise ValueError("szp stream length is not a multiple of 4 bytes")
    grid = ((nb + DECODE_TILE_BLOCKS - 1) // DECODE_TILE_BLOCKS,)
    decode_kernel[grid](stream, stream.view(torch.int32), index.to(torch.int64), out,
                        n, nb, rate_area_nbytes(n), float(eb), fmax,
                        P=DECODE_TILE_BLOCKS, PLAIN=(variant == "plain"), CHUNK=CHUNK_BLOCKS,
                        CLAMP=clamp, OUT_NARROW=(kernel_dtype != torch.float32),
                        **_launch_opts())
    if kernel_dtype == out_dtype:
        return out
    if out_dtype in (torch.float16, torch.float8_e4m3fn):
        fm = float(torch.finfo(out_dtype).max)
        out = out.clamp_(-fm, fm)
    return out.to(out_dtype)


__all__ = ["available", "encode", "decode", "BLOCK"]
