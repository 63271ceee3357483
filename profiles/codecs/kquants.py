"""GGUF's k-quants and Q8_0: llama.cpp's block layouts and its reference scale search, vectorised.

llama.cpp (ggml/src/ggml-quants.c; k-quants by Kawrakow, llama.cpp PR 1684, 2023). Blocks are
consecutive values of the flattened tensor; a partial last block is padded with zeros and stored
whole. Super-blocks of 256 values (Q8_0: blocks of 32):

| type | bytes | bits/w | layout, in byte order                                   | value              |
|------|-------|--------|---------------------------------------------------------|--------------------|
| Q2_K | 84    | 2.625  | scales[16] (scale low nibble, min high), qs[64], d, dmin | d*sc*q - dmin*m   |
| Q3_K | 110   | 3.4375 | hmask[32], qs[64], scales[12] (16 six-bit, -32), d      | d*sc*(q - 4*!hbit) |
| Q4_K | 144   | 4.5    | d, dmin, scales[12] (8 six-bit scales, 8 mins), qs[128] | d*sc*q - dmin*m    |
| Q5_K | 176   | 5.5    | d, dmin, scales[12], qh[32], qs[128]                    | d*sc*q - dmin*m    |
| Q6_K | 210   | 6.5625 | ql[128], qh[64], scales[16] int8, d                     | d*sc*(q - 32)      |
| Q8_0 | 34    | 8.5    | d, qs[32] int8                                          | d*q                |

(d, dmin fp16.) Sub-blocks: 16 values for Q2_K, Q3_K, Q6_K; 32 for Q4_K, Q5_K. Encoding follows
llama.cpp's `quantize_row_*_ref` (what `llama-quantize` runs without an importance matrix):

- Q2_K: per sub-block `make_qkx2_quants(16, 3, weights |x|, rmin -0.5, rdelta 0.1, 15 steps,
  mean absolute error)`, scales and mins to 4 bits against the largest, values re-quantized;
- Q3_K: `make_q3_quants(16, 4, do_rmse)` (signed, iterative per-value refinement weighted by
  x^2), scales to 6 bits against the largest magnitude;
- Q4_K / Q5_K: `make_qkx2_quants(32, 15|31, weights av_x + |x|, rmin -1|-0.5, 0.1, 20|15
  steps, squared error)`, scales and mins to 6 bits;
- Q6_K: `make_qx_quants(16, 32, rmse_type 1)` (19 candidate scales weighted by x^2), scales
  to int8;
- Q8_0: d = max|x| / 127, q = round(x / d) half away from zero (bytes equal `gguf`'s).

The search runs over all sub-blocks at once in numpy fp32, with llama.cpp's operation order and
rounding (nearest_int: round half to even) but numpy's summation order, so a sub-block whose
candidate scales tie to the last bit may pick differently from the C code; `gguf` (llama.cpp's
Python package) decodes every payload, and `decode` equals `gguf.quants.dequantize` bit for bit
(tests/profiles/test_codecs_gguf.py). Departures, where the C code has undefined or non-finite
results: fp16 d/dmin saturate at +-65504 instead of becoming inf (values beyond about 3e6), and
blocks with a value beyond 2^12 are searched in float64 (in fp32 the sums overflow).
The Triton kernels in `kquants_triton` decode the same bytes bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 256
#: type -> (values per block, bytes per block)
TYPES = {"q2_k": (QK, 84), "q3_k": (QK, 110), "q4_k": (QK, 144), "q5_k": (QK, 176),
         "q6_k": (QK, 210), "q8_0": (32, 34)}
GROUP_MAX_EPS = np.float32(1e-15)
HUGE = 2.0 ** 12
_F = np.float32
_CHUNK_VALUES = 1 << 16          # values per encoding step: arrays stay in cache


def payload_nbytes(n: int, qtype: str) -> int:
    block, nbytes = TYPES[qtype]
    return nbytes * -(-n // block)


# --- helpers ----------------------------------------------------------------------------------

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int (fp32 round half to even); out-of-range values are clipped first."""
    return np.rint(np.clip(v, -4194303, 4194303)).astype(np.int32)


def _f16(v: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 round to nearest even, saturating at +-65504 (GGML would give inf)."""
    return np.clip(v, -65504, 65504).astype(np.float16)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b where b != 0, else 0 (the callers never use those entries); a's precision."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, _F(1)), _F(0))


def _argmax_abs(x: np.ndarray) -> np.ndarray:
    """x at the first position of the largest |x| per row (llama.cpp's `if (ax > amax)`)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """[B, 256] 2-bit values -> qs [B, 64]: byte 32c + l holds L[128c + l + 32k] at bits 2k."""
    L = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [B, 8] -> the 12 bytes of Q4_K/Q5_K (get_scale_min_k4)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4]
    out[:, 4:8] = lm[:, :4]
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return out


def _unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


# --- llama.cpp's scale searches, over all sub-blocks at once (rows) ---------------------------

def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric scale and min per row minimising the weighted error over nstep+1 candidates.

    Returns (scale [S], the_min [S] (>= 0, subtracted), L [S, n] in [0, nmax]).
    """
    lo = np.minimum(x.min(axis=1), _F(0))
    hi = x.max(axis=1)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)
    rng = hi - lo
    live = rng != 0                                   # max == min: L = 0, scale 0
    fmax = _F(nmax)
    xm = x - lo[:, None]
    buf = np.empty_like(x)
    wl = np.empty_like(x)

    def quant(iscale, out):
        # nearest_int(iscale * (x - min)) clamped to [0, nmax]; clamping first is the same
        np.multiply(iscale[:, None], xm, out=out)
        np.clip(out, 0, nmax, out=out)
        return np.rint(out, out=out)

    def error(scale, mn, L):
        np.multiply(scale[:, None], L, out=buf)      # (scale * L + min) - x, llama.cpp's order
        np.add(buf, mn[:, None], out=buf)
        np.subtract(buf, x, out=buf)
        if use_mad:
            np.abs(buf, out=buf)
        else:
            np.multiply(buf, buf, out=buf)
        np.multiply(buf, w, out=buf)
        return buf.sum(axis=1)

    iscale = _div(np.broadcast_to(fmax, rng.shape), rng)
    scale = _div(np.ones_like(iscale), iscale)
    L = quant(iscale, np.empty_like(x))
    best = error(scale, lo, L)
    mn = lo.copy()
    La = np.empty_like(x)
    for step in range(nstep + 1):
        iscale = _div(np.broadcast_to(_F(rmin) + _F(rdelta) * _F(step) + fmax, rng.shape), rng)
        quant(iscale, La)
        np.multiply(w, La, out=wl)
        sum_l = wl.sum(axis=1)
        sum_l2 = np.multiply(wl, La, out=buf).sum(axis=1)
        sum_xl = np.multiply(wl, x, out=buf).sum(axis=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = np.where(pos, _F(0), this_min)
        this_scale = np.where(pos, _div(sum_xl, sum_l2), this_scale)
        cur = error(this_scale, this_min, La)
        take = live & (D > 0) & (cur < best)
        if take.any():
            L[take] = La[take]
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    L[~live] = 0
    scale = np.where(live, scale, _F(0))
    return scale.astype(np.float32), (-mn).astype(np.float32), L.astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale per row with llama.cpp's iterative refinement (do_rmse, weights x^2).

    Returns (scale [S], L [S, n] in [0, 2 nmax - 1], offset by nmax).
    """
    mx = _argmax_abs(x)
    live = np.abs(mx) >= GROUP_MAX_EPS
    iscale = _div(np.broadcast_to(_F(-nmax), mx.shape), mx)
    L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
    w = x * x
    wx = w * x
    sumlx = (wx * L).sum(axis=1)
    suml2 = (w * L * L).sum(axis=1)
    # value by value (columns, contiguous once transposed), up to 5 passes; a row that changed
    # nothing in a pass cannot change in the next one, so later passes visit only changed rows
    xt, wt, wxt, Lt = x.T.copy(), w.T.copy(), wx.T.copy(), L.T.copy()
    rows = np.arange(x.shape[0])
    for _ in range(5):
        xs, ws, wxs, Ls = xt[:, rows], wt[:, rows], wxt[:, rows], Lt[:, rows]
        slx_all, sl2_all = sumlx[rows], suml2[rows]
        changed = np.zeros(rows.size, bool)
        for i in range(x.shape[1]):
            wi, xi, wxi, li = ws[i], xs[i], wxs[i], Ls[i]
            slx = slx_all - wxi * li
            sl2 = sl2_all - wi * li * li
            new = np.clip(_nearest_int(_div(xi * sl2, slx)), -nmax, nmax - 1).astype(np.float32)
            slx2 = slx + wxi * new
            sl22 = sl2 + wi * new * new
            with np.errstate(over="ignore", invalid="ignore"):
                gain = (slx2 * slx2 * sl2_all) > (slx_all * slx_all * sl22)
            ok = (slx > 0) & (new != li) & (sl22 > 0) & gain
            Ls[i] = np.where(ok, new, li)
            slx_all = np.where(ok, slx2, slx_all)
            sl2_all = np.where(ok, sl22, sl2_all)
            changed |= ok
        Lt[:, rows], sumlx[rows], suml2[rows] = Ls, slx_all, sl2_all
        rows = rows[changed]
        if rows.size == 0:
            break
    scale = np.where(live, _div(sumlx, suml2), _F(0))
    L = np.where(live[:, None], Lt.T.astype(np.int32) + nmax, 0)
    return scale.astype(np.float32), L.astype(np.int32)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale per row, best of 19 candidates weighted by x^2 (rmse_type 1).

    Returns (scale [S], L [S, n] in [0, 2 nmax - 1], offset by nmax).
    """
    mx = _argmax_abs(x)
    live = np.abs(mx) >= GROUP_MAX_EPS
    w = x * x

    def sums(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(np.float32)
        return l, (w * x * lf).sum(axis=1), (w * lf * lf).sum(axis=1)

    L, sumlx, suml2 = sums(_div(np.broadcast_to(_F(-nmax), mx.shape), mx))
    scale = _div(sumlx, suml2)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = _div(np.broadcast_to(-(_F(nmax) + _F(0.1) * _F(step)), mx.shape), mx)
        l, slx, sl2 = sums(iscale)
        with np.errstate(over="ignore", invalid="ignore"):
            take = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(take[:, None], l, L)
        scale = np.where(take, _div(slx, sl2), scale)
        best = np.where(take, scale * slx, best)
    scale = np.where(live, scale, _F(0))
    L = np.where(live[:, None], L + nmax, 0)
    return scale.astype(np.float32), L.astype(np.int32)


# --- quantize_row_*_ref per type, over blocks [B, 256] ----------------------------------------

def _quantize_q2_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(B, 16), mins.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    q4 = _F(15)
    ls = np.where(max_scale[:, None] > 0, _nearest_int(_div(q4, max_scale)[:, None] * scales), 0)
    lm = np.where(max_min[:, None] > 0, _nearest_int(_div(q4, max_min)[:, None] * mins), 0)
    sc_bytes = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    d16 = _f16(np.where(max_scale > 0, max_scale / q4, _F(0)))
    m16 = _f16(np.where(max_min > 0, max_min / q4, _F(0)))
    d = d16.astype(np.float32)[:, None] * (sc_bytes & 0xF).astype(np.float32)
    dm = m16.astype(np.float32)[:, None] * (sc_bytes >> 4).astype(np.float32)
    req = np.clip(_nearest_int(_div(sub.reshape(B, 16, 16) + dm[..., None], d[..., None])), 0, 3)
    L = np.where(d[..., None] != 0, req, L).reshape(B, QK)
    return np.concatenate([sc_bytes, _pack_2bit(L), d16.reshape(B, 1).view(np.uint8),
                           m16.reshape(B, 1).view(np.uint8)], axis=1)


def _quantize_q3_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, L = make_q3_quants(sub, 4)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = _argmax_abs(scales)
    live = max_scale != 0
    iscale = _div(np.broadcast_to(_F(-32), max_scale.shape), max_scale)
    l = (_nearest_int(iscale[:, None] * scales).astype(np.int8)).astype(np.int32)
    l = np.where(live[:, None], np.clip(l, -32, 31) + 32, 0)
    sb = np.zeros((B, 12), np.uint8)
    sb[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    hi = l >> 4
    for k in range(4):
        sb[:, 8:12] |= (hi[:, 4 * k:4 * k + 4] << (2 * k)).astype(np.uint8)
    d16 = _f16(np.where(live, _div(np.ones_like(iscale), iscale), _F(0)))
    sc = (l - 32).astype(np.float32)
    d = d16.astype(np.float32)[:, None] * sc
    req = np.clip(_nearest_int(_div(sub.reshape(B, 16, 16), d[..., None])), -4, 3) + 4
    L = np.where(d[..., None] != 0, req, L).reshape(B, QK)
    high = L > 3
    # hmask[m] bit k is the high bit of value 32k + m
    hmask = np.zeros((B, 32), np.uint8)
    for k in range(8):
        hmask |= (high[:, 32 * k:32 * k + 32].astype(np.uint8) << k)
    L = np.where(high, L - 4, L)
    return np.concatenate([hmask, _pack_2bit(L), sb, d16.reshape(B, 1).view(np.uint8)], axis=1)


def _quantize_q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple:
    B = x.shape[0]
    sub = x.reshape(-1, 32)
    av_x = np.sqrt((sub * sub).sum(axis=1) / _F(32))
    w = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, w, nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.reshape(B, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    inv_scale = np.where(max_scale > 0, _div(_F(63), max_scale), _F(0))
    inv_min = np.where(max_min > 0, _div(_F(63), max_min), _F(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = _pack_scales_k4(ls, lm)
    d16 = _f16(max_scale / _F(63))
    m16 = _f16(max_min / _F(63))
    sc, m = _unpack_scales_k4(packed)
    d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)
    dm = m16.astype(np.float32)[:, None] * m.astype(np.float32)
    req = np.clip(_nearest_int(_div(sub.reshape(B, 8, 32) + dm[..., None], d[..., None])), 0, nmax)
    L = np.where(d[..., None] != 0, req, L).reshape(B, 4, 2, 32)
    head = np.concatenate([d16.reshape(B, 1).view(np.uint8), m16.reshape(B, 1).view(np.uint8),
                           packed], axis=1)
    return head, L


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    head, L = _quantize_q45_k(x, 15, -1.0, 20)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).astype(np.uint8).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1)


def _quantize_q5_k(x: np.ndarray) -> np.ndarray:
    head, L = _quantize_q45_k(x, 31, -0.5, 15)
    B = x.shape[0]
    qh = np.zeros((B, 32), np.uint8)
    for c in range(4):                         # value 64c + j: bit 2c; 64c + 32 + j: bit 2c + 1
        qh |= ((L[:, c, 0] > 15).astype(np.uint8) << (2 * c))
        qh |= ((L[:, c, 1] > 15).astype(np.uint8) << (2 * c + 1))
    low = (L & 0xF).astype(np.uint8)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(B, 128)
    return np.concatenate([head, qh, qs], axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, L = make_qx_quants(sub, 32)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = _argmax_abs(scales)
    live = np.abs(max_scale) >= GROUP_MAX_EPS
    iscale = _div(np.broadcast_to(_F(-128), max_scale.shape), max_scale)
    d16 = _f16(np.where(live, _div(np.ones_like(iscale), iscale), _F(0)))
    sc = np.where(live[:, None], np.minimum(127, _nearest_int(iscale[:, None] * scales)), 0)
    sc = sc.astype(np.int8)
    d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)
    req = np.clip(_nearest_int(_div(sub.reshape(B, 16, 16), d[..., None])), -32, 31) + 32
    L = np.where(d[..., None] != 0, req, L)
    L = np.where(live[:, None, None], L, 0).reshape(B, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(B, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(B, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d16.reshape(B, 1).view(np.uint8)], axis=1)


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1) / _F(127)
    iscale = _div(np.ones_like(d), d)
    v = x * iscale[:, None]
    a = np.abs(v)                              # roundf (half away from zero), as gguf writes it
    q = (np.sign(v) * (np.floor(a) + np.floor(_F(2) * (a - np.floor(a))))).astype(np.int8)
    return np.concatenate([_f16(d).reshape(-1, 1).view(np.uint8), q.view(np.uint8)], axis=1)


_QUANTIZE = {"q2_k": _quantize_q2_k, "q3_k": _quantize_q3_k, "q4_k": _quantize_q4_k,
             "q5_k": _quantize_q5_k, "q6_k": _quantize_q6_k, "q8_0": _quantize_q8_0}


def encode(x: np.ndarray, qtype: str) -> np.ndarray:
    """The payload (uint8) of flat fp32 values: blocks of `qtype`, the last one zero-padded."""
    block, nbytes = TYPES[qtype]
    nb = -(-x.size // block)
    xb = np.zeros(nb * block, np.float32)
    xb[:x.size] = x
    xb = xb.reshape(nb, block)
    step = max(1, _CHUNK_VALUES // block)
    out = np.empty((nb, nbytes), np.uint8)
    # blocks beyond 2^12 would overflow fp32 in the searches' sums of x^4 ... x^8 (the C code
    # then silently skips refinements or yields NaN): they are searched in float64
    huge = np.abs(xb).max(axis=1) > HUGE
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        for lo in range(0, nb, step):
            out[lo:lo + step] = _QUANTIZE[qtype](xb[lo:lo + step])
        if huge.any():
            out[huge] = _QUANTIZE[qtype](xb[huge].astype(np.float64))
    return out.reshape(-1)


# --- decoding, exactly as gguf.quants.dequantize ----------------------------------------------

def _f16_at(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as fp32 [B, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _shifted(b: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """b[..., None, :] >> shifts, as int32 with the shift axis before the last."""
    s = torch.tensor(shifts, dtype=torch.int32, device=b.device).reshape(-1, 1)
    return b.to(torch.int32).unsqueeze(-2) >> s


def _decode_blocks(b: torch.Tensor, qtype: str) -> torch.Tensor:
    B = b.shape[0]
    if qtype == "q8_0":
        return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16_at(b, 0)
    if qtype == "q2_k":
        sc = b[:, :16].to(torch.int32)
        d, dmin = _f16_at(b, 80), _f16_at(b, 82)
        dl = (d * (sc & 0xF).to(torch.float32))[..., None]
        ml = (dmin * (sc >> 4).to(torch.float32))[..., None]
        q = (_shifted(b[:, 16:80].reshape(B, 2, 32), [0, 2, 4, 6]) & 3).reshape(B, 16, 16)
        return (dl * q.to(torch.float32) - ml).reshape(B, QK)
    if qtype == "q3_k":
        s = b[:, 96:108].to(torch.int32)
        lsc = (_shifted(s[:, :8], [0, 4]).reshape(B, 16)) & 0xF
        hsc = (_shifted(s[:, 8:12], [0, 2, 4, 6]).reshape(B, 16)) & 3
        scale = ((lsc | (hsc << 4)) - 32).to(torch.float32)
        dl = (_f16_at(b, 108) * scale)[..., None]
        ql = (_shifted(b[:, 32:96].reshape(B, 2, 32), [0, 2, 4, 6]) & 3).reshape(B, 16, 16)
        qh = (_shifted(b[:, :32].reshape(B, 1, 32), list(range(8))) & 1).reshape(B, 16, 16)
        q = ql - ((qh ^ 1) << 2)
        return (dl * q.to(torch.float32)).reshape(B, QK)
    if qtype in ("q4_k", "q5_k"):
        d, dmin = _f16_at(b, 0), _f16_at(b, 2)
        s = b[:, 4:16].to(torch.int32)
        sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 2) & 0x30)], dim=1)
        m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 2) & 0x30)], dim=1)
        dl = (d * sc.to(torch.float32))[..., None]
        ml = (dmin * m.to(torch.float32))[..., None]
        qs = b[:, 16:144] if qtype == "q4_k" else b[:, 48:176]
        q = (_shifted(qs.reshape(B, 4, 32), [0, 4]) & 0xF).reshape(B, 8, 32)
        if qtype == "q5_k":
            qh = (_shifted(b[:, 16:48].reshape(B, 1, 32), list(range(8))) & 1).reshape(B, 8, 32)
            q = q | (qh << 4)
        return (dl * q.to(torch.float32) - ml).reshape(B, QK)
    if qtype == "q6_k":
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        dl = (_f16_at(b, 208) * sc)[..., None]
        ql = (_shifted(b[:, :128].reshape(B, 2, 64), [0, 4]) & 0xF).reshape(B, 8, 32)
        qh = (_shifted(b[:, 128:192].reshape(B, 2, 32), [0, 2, 4, 6]) & 3).reshape(B, 8, 32)
        q = ((ql | (qh << 4)) - 32).reshape(B, 16, 16)
        return (dl * q.to(torch.float32)).reshape(B, QK)
    raise ValueError(f"unknown GGUF type {qtype!r}")


def decode(payload: torch.Tensor, n: int, qtype: str) -> torch.Tensor:
    """n fp32 values from a payload (uint8 tensor on any device), as gguf.quants.dequantize."""
    block, nbytes = TYPES[qtype]
    blocks = payload.reshape(-1, nbytes)
    step = max(1, _CHUNK_VALUES // block)
    parts = [_decode_blocks(blocks[lo:lo + step], qtype).reshape(-1)
             for lo in range(0, blocks.shape[0], step)]
    return torch.cat(parts)[:n] if len(parts) > 1 else parts[0][:n]


__all__ = ["QK", "TYPES", "payload_nbytes", "encode", "decode", "make_qkx2_quants",
           "make_q3_quants", "make_qx_quants"]
