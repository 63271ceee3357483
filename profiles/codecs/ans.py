"""`ans`: SZ3's error-bounded linear quantization (no predictor), entropy-coded with interleaved
rANS in independent chunks, so that one GPU kernel decodes every chunk in parallel.

The quantizer is SZ3's `LinearQuantizer` with prediction 0 (Liang et al., "SZ3: A Modular
Framework for Composing Prediction-Based Error-Bounded Lossy Compressors", IEEE TBD 2022), in fp32:

    r = fp32(1 / eb);  h = (trunc(|x|·r) + 1) >> 1;  q = h with the sign of x;  x̂ = fp32(2q)·eb

A value is an OUTLIER, stored exactly as a patch (`profiles.codecs.patches`), when SZ3's own check
|x̂ − x| > eb fails in fp32, or when |q| exceeds the radius R chosen for the tensor (R minimizes the
estimated size: table + coded symbols + outliers). Under the strict bound (the default) a value
whose x̂, rounded to the original dtype, misses the bound is decoded one dtype step towards x̂
instead (always within the bound, see `nudge`): its own symbol, about 10 bits, not a 48-bit patch.
Symbols: 0 outlier, 1 + R + q for |q| <= R, 3R + 2 + q for the nudged value of q.

The entropy coder is rANS (Duda, "Asymmetric numeral systems", 2013) with 32-bit states, 16-bit
words and probabilities quantized to M = 2^prob_bits, interleaved over 32 lanes (Giesen,
"Interleaved entropy coders", 2014) in the warp-synchronous layout of DietGPU (Johnson, 2021): a
chunk holds 32·S values, value t·32 + j of the chunk belongs to lane j, and at decode step t the
lanes whose state fell below 2^16 read the chunk's next words in lane order. Chunks are
independent; the last one may have fewer steps (its values padded to a multiple of 32).

Payload (little-endian), each section padded to a multiple of 4 bytes, sizes in the blob's meta
(`lanes`, `steps`, `prob_bits`, `radius`, `nudged`, `chunks`, `words`, `patches`):

    K uint16            symbol frequencies, summing to M (K = 2R + 2, or 4R + 3 with nudged)
    chunks × 32 uint32  the lanes' final encoder states (the decoder's initial states)
    chunks uint32       each chunk's first word, as an index into the word section
    words uint16        the chunks' words, chunk after chunk
    patches             the outliers (`profiles.codecs.patches`)

This module is the reference: the vectorized numpy encoder and decoder run on the CPU (all lanes
of all chunks advance together, one numpy operation per step), and the Triton decoder in
`ans_triton` is tested bit-identical to it. Decoders look each value up in a table built from the
frequencies, so CPU and GPU write the same original-dtype bits by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs import patches
from profiles.codecs.dtypes import cast_back, dtype_name
from profiles.codecs.registry import Codec, Encoded, payload_tensor
from profiles.errors import CodecError

LANES = 32
STEPS = 512                    # steps per lane in a full chunk: a chunk holds 16384 values
PROB_BITS = 14
STATE_LOW = 1 << 16            # rANS states live in [2^16, 2^32)
SZ3_RADIUS = 32768             # SZ3's default quantization radius
MAX_RADIUS = SZ3_RADIUS - 1    # the largest |q| SZ3 codes
_OUTLIER_BITS = 32             # an outlier's index; its value costs 8 bits per byte on top
OUTLIER = 3 * SZ3_RADIUS       # the code of a value stored exactly (beyond any radius)
NUDGED = 2 * SZ3_RADIUS        # added to q for a strict-bound violator decoded one dtype step in
_PIECE = 1 << 16


# ----------------------------------------------------------------------------- dtype bits

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_FP8_TO_F32 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _bits_of(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a CPU tensor as an unsigned numpy array of the same width."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(width).numpy().view(_UINT[t.element_size()])


def to_f32(bits: np.ndarray, name: str) -> np.ndarray:
    """fp32 values of raw dtype bits (exact)."""
    if name == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if name == "fp16":
        return bits.view(np.float16).astype(np.float32)
    if name == "fp8_e4m3":
        return _FP8_TO_F32[bits]
    return bits.view(np.float32)


def round_bits(x32: np.ndarray, name: str) -> np.ndarray:
    """Raw bits of fp32 values rounded to the dtype: `dtypes.cast_back` (nearest even, saturating)."""
    if name == "bf16":
        b = x32.view(np.uint32)
        return ((b + (0x7FFF + ((b >> 16) & 1))) >> 16).astype(np.uint16)
    if name == "fp16":
        return np.clip(x32, -65504.0, 65504.0).astype(np.float16).view(np.uint16)
    if name == "fp8_e4m3":
        return _bits_of(cast_back(torch.from_numpy(np.ascontiguousarray(x32)), name))
    return x32.view(np.uint32).copy()


def nudge(bits: np.ndarray, x32: np.ndarray, name: str) -> np.ndarray:
    """The dtype value next to `bits` in the direction of the fp32 value x32 it was rounded from.

    Why this meets the bound where the rounded value r does not: x lies on the dtype's grid and
    |x32 - x| <= eb; if r misses, r and x lie on opposite sides of x32, so the grid value next to r
    towards x32 lies between x and x32 (r is x32's nearest grid value). Raw bits are sign and
    magnitude, so one step away from zero is bits + 1 and towards zero bits - 1.
    """
    up = np.abs(x32) > np.abs(to_f32(bits, name))
    step = np.where(up, 1, -1).astype(np.int64)
    return (bits.astype(np.int64) + step).astype(bits.dtype)


# ----------------------------------------------------------------------------- quantization

def reciprocal(eb: float) -> np.float32:
    """SZ3's `error_bound_reciprocal`: 1/eb in double, stored as fp32."""
    return np.float32(1.0 / float(eb))


def quantize(x32: np.ndarray, eb: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SZ3 linear quantization with prediction 0, in fp32.

    Returns:
        (q int32 codes, ok bool, x̂ fp32 reconstructions): ok is False where SZ3 would store the
        value as unpredictable (|x̂ − x| > eb in fp32, or |q| beyond SZ3's radius).
    """
    e = np.float32(eb)
    lim = np.float32(2 * SZ3_RADIUS - 1)
    a = np.abs(x32)
    a *= reciprocal(eb)                                           # fp32
    ok = a < lim                                                  # trunc(a) + 1 < 2 * radius
    np.minimum(a, lim, out=a)
    h = a.astype(np.int32)
    h += 1
    h >>= 1
    qf = h.astype(np.float32)
    np.copysign(qf, x32, out=qf)                                  # -0 for x = -0: q = 0
    xhat = qf * (e * np.float32(2))                               # fp32(2q)·eb, one rounding
    ok &= np.abs(xhat - x32) <= e
    return qf.astype(np.int32), ok, xhat


def codes(x: torch.Tensor, eb: float, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes of a CPU tensor (q, q + NUDGED for strict-bound violators, OUTLIER for values stored
    exactly) and their histogram (`choose_radius`'s bins).

    Works in numpy, in pieces of 2^16 values, so that temporaries stay in the CPU cache (and no
    torch threads wait for each other on a loaded machine).

    Args:
        x: flat CPU tensor of the original dtype.
        eb: the absolute bound (an fp32 value).
        strict: check each reconstruction rounded to x's dtype against eb; where it misses, use the
            neighbouring dtype value towards the fp32 reconstruction (always within eb, see
            `nudge`), or store the value exactly if even that misses.
    """
    n = x.numel()
    out = np.empty(n, np.int32)
    hist = np.zeros(OUTLIER + MAX_RADIUS + 1, np.int64)
    name = dtype_name(x.dtype)
    bits = _bits_of(x)
    e = np.float32(eb)
    for lo in range(0, n, _PIECE):
        x32 = to_f32(bits[lo:lo + _PIECE], name)
        q, ok, xhat = quantize(x32, eb)
        code = out[lo:lo + _PIECE]
        np.copyto(code, q)
        np.copyto(code, OUTLIER, where=~ok)
        if strict:
            near = round_bits(xhat, name)
            miss = np.flatnonzero(ok & _misses(to_f32(near, name), x32, e, name))
            if miss.size:
                far = nudge(near[miss], xhat[miss], name)
                good = ~_misses(to_f32(far, name), x32[miss], e, name)
                code[miss] = np.where(good, q[miss] + NUDGED, OUTLIER)
        # normal codes counted in a small window, the rare nudged and outlier codes one by one
        rare = code > MAX_RADIUS
        qmin, qmax = int(code.min()), int(np.where(rare, -MAX_RADIUS, code).max())
        if qmin <= qmax:
            small = np.bincount(np.minimum(code, qmax + 1) - qmin, minlength=qmax - qmin + 2)
            hist[qmin + MAX_RADIUS: qmax + MAX_RADIUS + 1] += small[:-1]
        if qmin > qmax or small[-1]:
            np.add.at(hist, code[rare] + MAX_RADIUS, 1)
    return out, hist


def _misses(back: np.ndarray, x32: np.ndarray, e: np.float32, name: str) -> np.ndarray:
    """|back − x| > eb, exactly: in fp32 for 16- and 8-bit dtypes (the difference of two of their
    values is exact in fp32 wherever it is near eb), in float64 for fp32 tensors."""
    if name == "fp32":
        return np.abs(back.astype(np.float64) - x32.astype(np.float64)) > float(e)
    return np.abs(back - x32) > e


def dequantize(q: np.ndarray, eb: float) -> np.ndarray:
    """fp32 reconstruction fp32(2q)·eb."""
    return (q.astype(np.float32) * np.float32(2)) * np.float32(eb)


def value_table(radius: int, nudged: bool, eb: float, name: str) -> np.ndarray:
    """Raw dtype bits each symbol decodes to (symbol 0, outliers: 0 until patched)."""
    q = np.arange(-radius, radius + 1, dtype=np.int32)
    xhat = dequantize(q, eb)
    near = round_bits(xhat, name)
    parts = [np.zeros(1, near.dtype), near] + ([nudge(near, xhat, name)] if nudged else [])
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- the table

def normalize(counts: np.ndarray, total_freq: int) -> np.ndarray:
    """Frequencies summing to `total_freq`, >= 1 for every present symbol, ~ proportional to counts.

    A scale is searched so that sum(max(1, round(c * scale))) is as close to `total_freq` as it gets;
    the few units left are taken from or given to the most frequent symbols.
    """
    present = np.flatnonzero(counts)
    if present.size == 0 or present.size > total_freq:
        raise ValueError(f"{present.size} symbols cannot share {total_freq} frequency slots")
    c = counts[present].astype(np.float64)

    def freqs(scale: float) -> np.ndarray:
        return np.maximum(1, np.round(c * scale)).astype(np.int64)

    lo, hi = 0.0, total_freq / c.min()
    for _ in range(40):
        mid = (lo + hi) / 2
        if freqs(mid).sum() > total_freq:
            hi = mid
        else:
            lo = mid
    f = freqs(lo)
    diff = total_freq - int(f.sum())
    for s in np.argsort(-c, kind="stable"):
        if diff == 0:
            break
        step = diff if diff > 0 else -min(-diff, int(f[s]) - 1)
        f[s] += step
        diff -= step
    out = np.zeros(counts.size, np.int64)
    out[present] = f
    return out


def symbol_counts(hist: np.ndarray, radius: int, nudged: bool) -> np.ndarray:
    """Counts of the symbols for a radius, from the bins of `codes` (see `symbol_table`)."""
    lo, hi = MAX_RADIUS - radius, MAX_RADIUS + radius + 1
    inner = [hist[lo:hi]] + ([hist[NUDGED + lo: NUDGED + hi]] if nudged else [])
    kept = sum(int(v.sum()) for v in inner)
    return np.concatenate([[int(hist.sum()) - kept]] + inner)


def choose_radius(hist: np.ndarray, itemsize: int,
                  prob_bits: int = PROB_BITS) -> tuple[int, bool, np.ndarray]:
    """The radius R and symbol frequencies that minimize the estimated payload size.

    The estimate: sum over symbols of count * log2(M / frequency), plus 32 bits and the value for
    each outlier, plus 16 bits per table entry; R is searched over 0, the largest |q| present, and
    48 values spaced geometrically between.

    Args:
        hist: counts of the tensor's codes (`codes`): bin q + MAX_RADIUS, q + NUDGED +
            MAX_RADIUS for nudged ones, the last bin outliers.
        itemsize: bytes of one original value (an outlier's cost besides its 32-bit index).

    Returns:
        (R, whether nudged symbols are used, frequencies of the symbols, symbol 0 first).
    """
    m = 1 << prob_bits
    if int(hist.sum()) == 0:                             # no values: any valid table
        return 0, False, normalize(np.array([0, 1]), m)
    nudged = bool(hist[NUDGED: NUDGED + 2 * MAX_RADIUS + 1].any())
    both = hist[: 2 * MAX_RADIUS + 1] + hist[NUDGED: NUDGED + 2 * MAX_RADIUS + 1]
    present = np.flatnonzero(both)
    reach = int(np.abs(present - MAX_RADIUS).max()) if present.size else 0
    cand = {0, reach} | set(int(r) for r in np.unique(np.round(np.geomspace(1, max(reach, 1), 48))))
    best = None
    for r in sorted(v for v in cand if v <= reach):
        counts = symbol_counts(hist, r, nudged)
        if int((counts > 0).sum()) > m:
            continue
        f = normalize(counts, m)
        used = counts > 0
        bits = float((counts[used] * np.log2(m / f[used])).sum())
        bits += counts[0] * (_OUTLIER_BITS + 8 * itemsize) + 16 * counts.size
        if best is None or bits < best[0]:
            best = (bits, r, f)
    return best[1], nudged, best[2]


def symbol_table(radius: int, nudged: bool) -> np.ndarray:
    """Symbol of each code + MAX_RADIUS: 0 outlier, 1 + R + q for |q| <= R, then 3R + 2 + q for
    the nudged value of q."""
    lut = np.zeros(OUTLIER + MAX_RADIUS + 1, np.intp)
    lut[MAX_RADIUS - radius: MAX_RADIUS + radius + 1] = np.arange(1, 2 * radius + 2)
    if nudged:
        at = NUDGED + MAX_RADIUS
        lut[at - radius: at + radius + 1] = np.arange(2 * radius + 2, 4 * radius + 3)
    return lut


# ----------------------------------------------------------------------------- rANS

def chunk_geometry(n: int, steps: int) -> tuple[int, int, int]:
    """(full chunks, values in the tail chunk, steps of the tail chunk) for n values."""
    full, rem = divmod(n, LANES * steps)
    return full, rem, -(-rem // LANES)


def rans_encode(syms: np.ndarray, freqs: np.ndarray, prob_bits: int = PROB_BITS,
                steps: int = STEPS, table: np.ndarray | None = None,
                shift: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interleaved rANS encode of symbols 0..K-1 (vectorized over every lane of every chunk).

    The state arithmetic runs in float64, exact for states below 2^32 (the quotient x / f is never
    within 2^-21 of an integer without being one, since f <= 2^16). A lane renormalizes (emits its
    low 16 bits) when floor(x / f) >= 2^(32 - prob_bits), i.e. when x >= f * 2^(32 - prob_bits).

    Args:
        syms: the symbols, or with `table` the values table[v + shift] maps to symbols (mapped a
            step at a time, so that no tensor-sized symbol array is made).

    Returns:
        (states uint32 [chunks * 32], first word of each chunk uint32 [chunks], words uint16).
    """
    n = syms.size
    m = 1 << prob_bits
    full, rem, tail_steps = chunk_geometry(n, steps)
    chunks = full + (rem > 0)
    lanes = chunks * LANES
    if n == 0:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.uint16)
    body = syms[: full * steps * LANES].reshape(full, steps, LANES)
    if rem:                                   # the tail chunk, padded with the likeliest symbol
        pad = int(np.argmax(freqs))
        if table is not None:
            pad = int(np.flatnonzero(table == pad)[0]) - shift
        tail = np.full(tail_steps * LANES, pad, dtype=syms.dtype)
        tail[:rem] = syms[full * steps * LANES:]
        tail = tail.reshape(tail_steps, LANES)
    f64 = freqs.astype(np.float64)
    cum = (np.cumsum(freqs) - freqs).astype(np.float64)
    spare = m - f64                                   # x' = x + floor(x / f) * (M - f) + cum
    limit = float(1 << (32 - prob_bits))
    x = np.full(lanes, float(STATE_LOW))
    fb, qb, tb = np.empty(lanes), np.empty(lanes), np.empty(lanes)
    si = np.empty(lanes, np.intp)
    body_rows = si[: full * LANES].reshape(full, LANES)
    emitted, ws = [], []
    for t in range(steps - 1, -1, -1):
        a = lanes if (rem == 0 or t < tail_steps) else full * LANES
        xa, s, f, q, tmp = x[:a], si[:a], fb[:a], qb[:a], tb[:a]
        body_rows[...] = body[:, t, :]
        if a > full * LANES:
            si[full * LANES:] = tail[t]
        if table is not None:
            if shift:
                s += shift
            np.take(table, s, out=s)
        np.take(f64, s, out=f)
        np.divide(xa, f, out=q)
        np.floor(q, out=q)
        idx = np.flatnonzero(q >= limit)
        if idx.size:
            xi = xa[idx]
            hi = np.floor(xi * (1.0 / 65536.0))
            ws.append((xi - hi * 65536.0).astype(np.uint16))
            xa[idx] = hi
            q[idx] = np.floor(hi / f[idx])
        else:
            ws.append(np.zeros(0, np.uint16))
        emitted.append((idx >> 5).astype(np.int32) + np.int32(t * chunks))
        np.take(spare, s, out=tmp)
        q *= tmp
        xa += q
        np.take(cum, s, out=tmp)
        xa += tmp
    offsets, words = _place_words(emitted[::-1], ws[::-1], chunks, steps)
    return x.astype(np.uint32), offsets.astype(np.uint32), words


def _place_words(groups: list[np.ndarray], ws: list[np.ndarray], chunks: int,
                 steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay the emitted words out in decoder order: by chunk, then step, then lane.

    Args:
        groups: per decode step t (ascending), t * chunks + the chunk of each lane that read a
            word, in lane order.
        ws: the words they read, in the same order.

    Returns:
        (first word of each chunk, all words).
    """
    group = np.concatenate(groups) if groups else np.zeros(0, np.int32)
    words = np.concatenate(ws) if ws else np.zeros(0, np.uint16)
    per = np.bincount(group, minlength=steps * chunks).reshape(steps, chunks)
    total = per.sum(axis=0)
    offsets = np.cumsum(total) - total
    # word i of group (t, k) goes to offsets[k] + (k's words in steps before t) + (i - first[g])
    delta = offsets[None, :] + (np.cumsum(per, axis=0) - per)
    flat = per.reshape(-1)
    delta = delta.reshape(-1) - (np.cumsum(flat) - flat)
    pos = delta[group]
    pos += np.arange(words.size)
    out = np.empty(words.size, np.uint16)
    out[pos] = words
    return offsets, out


def decode_tables(freqs: np.ndarray, prob_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(symbol, frequency, bias = slot - cum) of each of the M slots (int64)."""
    m = 1 << prob_bits
    if freqs.size == 0 or int(freqs.sum()) != m or int(freqs.min()) < 0:
        raise ValueError(f"symbol frequencies sum to {int(freqs.sum()) if freqs.size else 0}, "
                         f"not {m}")
    sym = np.repeat(np.arange(freqs.size, dtype=np.intp), freqs)
    cum = np.cumsum(freqs) - freqs
    return sym, freqs[sym].astype(np.int64), (np.arange(m) - cum[sym]).astype(np.int64)


def rans_decode(states: np.ndarray, offsets: np.ndarray, words: np.ndarray, n: int,
                freqs: np.ndarray, values: np.ndarray, prob_bits: int = PROB_BITS,
                steps: int = STEPS) -> np.ndarray:
    """Decode n values: the rANS decoder of `rans_encode`, each symbol looked up in `values`.

    States are held in int64 so that every table look-up indexes with numpy's native integer.

    Args:
        values: the output of each symbol (any numpy dtype: original-dtype bits, or the symbols).

    Returns:
        n values of `values.dtype`, in the original order.

    Raises:
        ValueError: the streams are inconsistent (a lane does not end in the initial state or a
            chunk does not consume exactly its words).
    """
    full, rem, tail_steps = chunk_geometry(n, steps)
    chunks = full + (rem > 0)
    lanes = chunks * LANES
    if states.size != lanes or offsets.size != chunks:
        raise ValueError(f"{states.size} states and {offsets.size} chunk offsets for {n} values, "
                         f"expected {lanes} and {chunks}")
    if n == 0:
        return np.zeros(0, values.dtype)
    sym, f_slot, b_slot = decode_tables(freqs, prob_bits)
    v_slot = values[sym]
    mask = (1 << prob_bits) - 1
    x = states.astype(np.int64)
    pos = offsets.astype(np.int64)
    w64 = words.astype(np.int64) if words.size else np.zeros(1, np.int64)
    out = np.empty((chunks, steps, LANES), values.dtype)
    slot, fs = np.empty(lanes, np.int64), np.empty(lanes, np.int64)
    ar = np.arange(lanes)
    for t in range(steps):
        a = lanes if (rem == 0 or t < tail_steps) else full * LANES
        xa, sa, f = x[:a], slot[:a], fs[:a]
        np.bitwise_and(xa, mask, out=sa)
        out[: a >> 5, t, :] = np.take(v_slot, sa).reshape(-1, LANES)
        np.take(f_slot, sa, out=f)
        xa >>= prob_bits
        xa *= f
        xa += np.take(b_slot, sa, out=f)
        idx = np.flatnonzero(xa < STATE_LOW)
        if idx.size:
            k = idx >> 5
            cnt = np.bincount(k, minlength=a >> 5)
            base = pos[: a >> 5] + cnt
            base -= np.cumsum(cnt)
            g = xa[idx]
            g <<= 16
            g |= np.take(w64, base[k] + ar[: idx.size], mode="clip")  # checked after the loop
            xa[idx] = g
            pos[: a >> 5] += cnt
    ends = np.append(offsets[1:].astype(np.int64), words.size)
    if not (np.array_equal(pos, ends) and bool(np.all(x == STATE_LOW))):
        raise ValueError("the rANS lanes do not end where they started")
    return out.reshape(-1)[:n]


# ----------------------------------------------------------------------------- the codec

def _pad4(nbytes: int) -> int:
    return nbytes + (-nbytes) % 4


def num_symbols(radius: int, nudged: bool) -> int:
    return 4 * radius + 3 if nudged else 2 * radius + 2


def section_sizes(meta: dict, n: int, itemsize: int) -> list[int]:
    """Byte sizes of the payload's sections: table, states, offsets, words, patches."""
    k = num_symbols(int(meta["radius"]), bool(meta["nudged"]))
    chunks = int(meta["chunks"])
    return [_pad4(2 * k), 4 * LANES * chunks, 4 * chunks, _pad4(2 * int(meta["words"])),
            patches.section_nbytes(int(meta["patches"]), itemsize)]


class AnsCodec(Codec):
    """SZ3 quantization + interleaved rANS in chunks; CPU reference, Triton decoder on CUDA."""

    name = "ans"
    error_bounded = True
    gpu_decodable = True
    cpu_only = False
    description = ("SZ3 quantization (no predictor) + chunked interleaved rANS, decodes on GPU; "
                   "strict 1|0")
    option_spec = dict(patches.STRICT_OPTION)
    implicit_options = frozenset({"strict"})

    def saturation_reason(self, max_abs, abs_bound):
        return None          # values beyond SZ3's radius are outliers, never saturated codes

    def encode_payload(self, x, abs_bound, options):
        n = x.numel()
        if n >= 1 << 32:
            raise CodecError(f"ans: a tensor of {n} values is too large; split it below 2^32 values")
        xc = x.detach().to("cpu").reshape(-1)
        code, hist = codes(xc, abs_bound, patches.is_strict(options))
        radius, nudged, freqs = choose_radius(hist, x.element_size())
        table = symbol_table(radius, nudged)
        out_idx = np.concatenate([np.zeros(0, np.int64)] + [
            np.flatnonzero(np.take(table, code[lo:lo + _PIECE] + MAX_RADIUS) == 0) + lo
            for lo in range(0, n, _PIECE)])
        states, offsets, words = rans_encode(code, freqs, PROB_BITS, STEPS, table, MAX_RADIUS)
        meta = {"lanes": LANES, "steps": STEPS, "prob_bits": PROB_BITS, "radius": int(radius),
                "nudged": int(nudged), "chunks": int(offsets.size), "words": int(words.size),
                "patches": int(out_idx.size)}
        parts = [freqs.astype("<u2").view(np.uint8), states.astype("<u4").view(np.uint8),
                 offsets.astype("<u4").view(np.uint8), words.astype("<u2").view(np.uint8)]
        parts = [np.pad(p, (0, (-p.size) % 4)) for p in parts]
        parts.append(patches.pack(torch.from_numpy(out_idx), xc))
        return Encoded(payload=np.concatenate(parts), meta=meta)

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        n = int(np.prod(shape, dtype=np.int64))
        t = payload if isinstance(payload, torch.Tensor) else payload_tensor(payload)
        sections = split(t, meta, n, dtype)
        if n == 0:
            return torch.empty(0, dtype=dtype, device=device)
        if device.type == "cuda":
            from profiles.codecs import ans_triton

            if ans_triton.available()[0]:
                return ans_triton.decode(*[s.to(device) for s in sections], meta, n, abs_bound,
                                         dtype)
        return decode_cpu(*[s.cpu() for s in sections], meta, n, abs_bound, dtype).to(device)


def split(payload: torch.Tensor, meta: dict, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The payload's five sections (table, states, offsets, words, patches) as uint8 tensors.

    Raises:
        CodecError: the meta is malformed or the payload length does not match it.
    """
    try:
        sizes = section_sizes(meta, n, torch.empty((), dtype=dtype).element_size())
        steps, radius = int(meta["steps"]), int(meta["radius"])
        if (int(meta["lanes"]) != LANES or not 1 <= int(meta["prob_bits"]) <= 16 or steps < 1
                or not 0 <= radius <= MAX_RADIUS):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise CodecError(f"ans blob: meta {meta} is malformed; the blob is corrupt") from None
    if payload.numel() != sum(sizes):
        raise CodecError(f"ans blob: payload of {payload.numel()} bytes, expected {sum(sizes)} "
                         f"for {n} values; the blob is corrupt")
    full, rem, _ = chunk_geometry(n, steps)
    if int(meta["chunks"]) != full + (rem > 0):
        raise CodecError(f"ans blob: {meta['chunks']} chunks for {n} values; the blob is corrupt")
    out, at = [], 0
    for size in sizes:
        out.append(payload[at:at + size])
        at += size
    return out


def frequencies(table: torch.Tensor, meta: dict) -> np.ndarray:
    """The symbol frequencies (int64) from the table section (a CPU uint8 tensor)."""
    k = num_symbols(int(meta["radius"]), bool(meta["nudged"]))
    return table.numpy()[: 2 * k].view("<u2").astype(np.int64)


def decode_cpu(table: torch.Tensor, states: torch.Tensor, offsets: torch.Tensor,
               words: torch.Tensor, patch: torch.Tensor, meta: dict, n: int, abs_bound: float,
               dtype: torch.dtype) -> torch.Tensor:
    """The numpy reference decode of an `ans` payload's sections (CPU uint8 tensors).

    Returns:
        A flat CPU tensor of n values of `dtype`, outliers patched.

    Raises:
        CodecError: the sections are inconsistent.
    """
    vals = value_table(int(meta["radius"]), bool(meta["nudged"]), abs_bound, dtype_name(dtype))
    try:
        bits = rans_decode(states.numpy().view("<u4"), offsets.numpy().view("<u4"),
                           words.numpy()[: 2 * int(meta["words"])].view("<u2"), n,
                           frequencies(table, meta), vals, int(meta["prob_bits"]),
                           int(meta["steps"]))
    except ValueError as exc:
        raise CodecError(f"ans blob: {exc}; the blob is corrupt") from None
    signed = {1: np.uint8, 2: np.int16, 4: np.int32}[bits.itemsize]
    out = torch.from_numpy(bits.view(signed)).view(dtype)
    idx, pv = patches.unpack(patch, int(meta["patches"]), dtype, n)
    return patches.apply(out, idx, pv)


__all__ = ["AnsCodec", "quantize", "dequantize", "codes", "symbol_table", "choose_radius", "normalize",
           "rans_encode", "rans_decode", "value_table", "decode_cpu", "split", "LANES", "STEPS",
           "PROB_BITS"]
