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

Classes (format version 2): trained weight matrices differ in scale from row to row or column to
column, so the encoder may cut the rows, or the columns, of the tensor's matrices (its last two
dimensions; a stack of experts is a matrix each) into C = 2 or 4 classes by their mean |x| and give each class its own frequency table; a
value is coded with its row's (or column's) table (`choose_classes`: only where the estimated
payload shrinks; option `classes=0` keeps one table). On the built-in model's experts this saves
2–3 % of the payload at 4-bit-equivalent bounds (benchmarks/RESULTS.md).

Payload (little-endian), each section padded to a multiple of 4 bytes, sizes in the blob's meta
(`lanes`, `steps`, `prob_bits`, `radius`, `nudged`, `chunks`, `words`, `patches`, and with more
than one table `classes`, `axis` "row" or "col", `cols`, `mrows` rows per matrix):

    C × K uint16        symbol frequencies of each class, each summing to M (K = 2R + 2, or
                        4R + 3 with nudged; C = 1 without classes)
    map                 the class of each row (axis "row") or of each matrix's column ("col"),
                        2 bits each, four to a byte (`pack_map`); absent when C = 1
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

from dataclasses import dataclass

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


# ----------------------------------------------------------------------------- classes

CLASS_CHOICES = (2, 4)          # classes the rows or columns of a tensor may be split into
MAX_CLASS_SYMBOLS = 4096        # beyond this many symbols (tiny bounds) a tensor keeps one table
CLASS_SAMPLE = 1 << 18          # values of whole rows the class tables are counted on, at most
AXES = ("row", "col")


def class_layout(shape) -> tuple[int, int, int]:
    """(matrices, rows per matrix, columns) of a tensor as classes see it: its last two
    dimensions are matrices of rows (a 3-D tensor of stacked experts is one matrix per expert);
    (0, 0, 0) for a tensor of fewer than two dimensions."""
    if len(shape) < 2 or int(shape[-1]) == 0 or int(shape[-2]) == 0:
        return 0, 0, 0
    return int(np.prod(shape[:-2], dtype=np.int64)), int(shape[-2]), int(shape[-1])


@dataclass(frozen=True)
class ClassMap:
    """The class of each row (axis "row") or of each matrix's column ("col") of a tensor whose
    columns are a multiple of 32, so that the 32 lanes of a chunk at one step read one row, or
    32 consecutive columns of one row."""

    cmap: np.ndarray            # uint8 [rows] or [matrices * cols]
    axis: str
    mrows: int                  # rows per matrix
    cols: int

    def entry(self, i: np.ndarray) -> np.ndarray:
        """The map entry of flat value indices: their row, or their matrix's column."""
        if self.axis == "row":
            return i // self.cols
        return (i // (self.mrows * self.cols)) * self.cols + i % self.cols

    def blocks(self, chunks: int, steps: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
        """(class * scale of a block of values, the block each chunk codes at each step [steps,
        chunks]): a step's class offsets are table[block[t]], one gather. A block is a row
        ([rows, 1], broadcast over the lanes) or 32 consecutive columns ([blocks, 32])."""
        c = self.cmap.astype(np.int64) * scale
        table = c[:, None] if self.axis == "row" else c.reshape(-1, 32)
        first = (np.arange(chunks, dtype=np.int64) * (steps * LANES))[None, :] \
            + (np.arange(steps, dtype=np.int64) * LANES)[:, None]          # [steps, chunks]
        n = self.cmap.size * (self.cols if self.axis == "row" else self.mrows)
        block = self.entry(np.minimum(first, n - 1))
        return table, (block if self.axis == "row" else block // 32)

    def values(self) -> np.ndarray:
        """The class of every value, in order (uint8; for tests and checks)."""
        n = self.cmap.size * (self.cols if self.axis == "row" else self.mrows)
        return self.cmap[self.entry(np.arange(n))]


def _split(stat: np.ndarray, k: int) -> np.ndarray:
    """Classes 0..k-1 of rows (or columns) by their statistic, equal counts, smallest first."""
    order = np.argsort(stat, kind="stable")
    cls = np.empty(stat.size, np.uint8)
    cls[order] = (np.arange(stat.size) * k // max(stat.size, 1)).astype(np.uint8)
    return cls


def _table_bits(counts: np.ndarray) -> float:
    """Bits of coding `counts` at their own empirical probabilities (the entropy bound)."""
    c = counts[counts > 0].astype(np.float64)
    return float((c * np.log2(c.sum() / c)).sum()) if c.size else 0.0


def choose_classes(x: torch.Tensor, code: np.ndarray, table: np.ndarray, present: np.ndarray,
                   prob_bits: int = PROB_BITS) -> tuple[ClassMap, np.ndarray] | None:
    """Split the rows or the columns of a tensor into classes with a frequency table each, when
    that makes the payload smaller; None to keep one table.

    Trained weight matrices differ in scale from row to row (gate and up projections: output
    channels) or from column to column (down projections: input features), so a value's row or
    column says something about its code: coding each class with its own frequencies spends
    fewer bits than one table for all. Rows (or columns) are ranked by their mean |x| and cut
    into K classes of equal count. The axis and K (`CLASS_CHOICES`) are those with the smallest
    estimated size — each class's empirical entropy, plus 16 bits per table entry
    and 2 per row or column for the class map — counted on whole rows sampled evenly
    (`CLASS_SAMPLE` values at most; the tables and the map are costed at the sample's scale too)
    and compared with one table counted the same way. Every
    symbol of the tensor keeps a frequency of at least one in every class, so symbols the sample
    missed stay codable.

    Args:
        x: the tensor (its shape gives rows and columns); code: its codes (`codes`); table: the
            symbol of each code + MAX_RADIUS (`symbol_table`); present: whether each symbol
            occurs in the tensor (from its exact histogram).

    Returns:
        (the class map, frequencies [K, nsym]); None where one table is as small, or the rows
        are not a multiple of 32 values (the decoders' layout needs it).
    """
    matrices, mrows, cols = class_layout(tuple(x.shape))
    rows = matrices * mrows
    nsym = present.size
    if (rows < 2 * CLASS_CHOICES[0] or cols % LANES or cols == 0
            or nsym > MAX_CLASS_SYMBOLS):
        return None
    m = 1 << prob_bits
    step = max(1, -(-rows * cols // CLASS_SAMPLE))
    picked = np.arange(0, rows, step)
    sym = np.take(table, code.reshape(rows, cols)[picked] + MAX_RADIUS)   # [sampled rows, cols]
    # the sample's map entries: its rows, and its values' matrix columns [sampled rows, cols]
    entry = {"row": picked[:, None], "col": (picked // mrows)[:, None] * cols + np.arange(cols)}
    stats = _mean_abs(x.detach().to("cpu").reshape(matrices, mrows, cols))
    total = np.bincount(sym.reshape(-1), minlength=nsym)
    best_bits, best = _table_bits(total) + 16 * nsym / step, None
    for axis in AXES:
        for k in CLASS_CHOICES:
            cmap = _split(stats[axis], k)
            # counted on the sample alone: [sample] keys, not [rows or columns, symbols] counts
            key = cmap[entry[axis]].astype(np.int64) * nsym + sym
            counts = np.bincount(key.reshape(-1), minlength=k * nsym).reshape(k, nsym)
            bits = sum(_table_bits(c) for c in counts) + 16 * k * nsym / step
            bits += 2 * cmap.size / step                   # the map, at the sample's scale
            if bits < best_bits:
                best_bits, best = bits, (axis, cmap, counts)
    if best is None:
        return None
    axis, cmap, counts = best
    freqs = np.stack([normalize(np.where(present & (c == 0), 0.5, c), m) for c in counts])
    return ClassMap(cmap, axis, mrows, cols), freqs


def _mean_abs(x3: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean |x| of each row and of each matrix's column, in fp32, a matrix at a time."""
    matrices, mrows, cols = x3.shape
    row = np.empty(matrices * mrows, np.float32)
    col = np.empty(matrices * cols, np.float32)
    for i in range(matrices):
        a = x3[i].to(torch.float32).abs_()
        row[i * mrows:(i + 1) * mrows] = a.mean(dim=1).numpy()
        col[i * cols:(i + 1) * cols] = a.mean(dim=0).numpy()
    return {"row": row, "col": col}


# ----------------------------------------------------------------------------- rANS

def chunk_geometry(n: int, steps: int) -> tuple[int, int, int]:
    """(full chunks, values in the tail chunk, steps of the tail chunk) for n values."""
    full, rem = divmod(n, LANES * steps)
    return full, rem, -(-rem // LANES)


def rans_encode(syms: np.ndarray, freqs: np.ndarray, prob_bits: int = PROB_BITS,
                steps: int = STEPS, table: np.ndarray | None = None,
                shift: int = 0, classes: ClassMap | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interleaved rANS encode of symbols 0..K-1 (vectorized over every lane of every chunk).

    The state arithmetic runs in float64, exact for states below 2^32 (the quotient x / f is never
    within 2^-21 of an integer without being one, since f <= 2^16). A lane renormalizes (emits its
    low 16 bits) when floor(x / f) >= 2^(32 - prob_bits), i.e. when x >= f * 2^(32 - prob_bits).

    Args:
        syms: the symbols, or with `table` the values table[v + shift] maps to symbols (mapped a
            step at a time, so that no tensor-sized symbol array is made).
        freqs: the frequencies of the K symbols [K], or of each class's symbols [classes, K].
        classes: with 2-D `freqs`, the class map (`ClassMap`) that selects each value's row of
            frequencies.

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
    ftab = np.atleast_2d(freqs)
    nsym = ftab.shape[1]
    body = syms[: full * steps * LANES].reshape(full, steps, LANES)
    ctab = cblk = None
    if classes is not None and ftab.shape[0] > 1:
        ctab, cblk = classes.blocks(chunks, steps, nsym)
    if rem:                                   # the tail chunk, padded with the likeliest symbol
        pad = int(np.argmax(ftab[0]))
        if table is not None:
            pad = int(np.flatnonzero(table == pad)[0]) - shift
        tail = np.full(tail_steps * LANES, pad, dtype=syms.dtype)
        tail[:rem] = syms[full * steps * LANES:]
        tail = tail.reshape(tail_steps, LANES)
    f64 = ftab.reshape(-1).astype(np.float64)         # class c's symbol s at c * nsym + s
    cum = (np.cumsum(ftab, axis=1) - ftab).reshape(-1).astype(np.float64)
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
        if ctab is not None:
            s2 = s.reshape(-1, LANES)
            np.add(s2, ctab[cblk[t, : a >> 5]], out=s2)
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
    """(symbol, frequency, bias = slot - cum) of each of the M slots (int64); with one row of
    frequencies per class ([classes, K]), class c's slots follow at c * M."""
    m = 1 << prob_bits
    parts = []
    for f in np.atleast_2d(freqs):
        if f.size == 0 or int(f.sum()) != m or int(f.min()) < 0:
            raise ValueError(f"symbol frequencies sum to {int(f.sum()) if f.size else 0}, "
                             f"not {m}")
        sym = np.repeat(np.arange(f.size, dtype=np.intp), f)
        cum = np.cumsum(f) - f
        parts.append((sym, f[sym].astype(np.int64), (np.arange(m) - cum[sym]).astype(np.int64)))
    return tuple(np.concatenate(p) for p in zip(*parts))


def rans_decode(states: np.ndarray, offsets: np.ndarray, words: np.ndarray, n: int,
                freqs: np.ndarray, values: np.ndarray, prob_bits: int = PROB_BITS,
                steps: int = STEPS, classes: ClassMap | None = None) -> np.ndarray:
    """Decode n values: the rANS decoder of `rans_encode`, each symbol looked up in `values`.

    States are held in int64 so that every table look-up indexes with numpy's native integer.

    Args:
        values: the output of each symbol (any numpy dtype: original-dtype bits, or the symbols).
        freqs, classes: as for `rans_encode`.

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
    ctab = cblk = None
    if classes is not None and np.atleast_2d(freqs).shape[0] > 1:
        ctab, cblk = classes.blocks(chunks, steps, 1 << prob_bits)
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
        if ctab is not None:               # class c's slots start at c * M
            s2 = sa.reshape(-1, LANES)
            np.add(s2, ctab[cblk[t, : a >> 5]], out=s2)
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


def num_classes(meta: dict) -> int:
    """Frequency tables of a payload (1 in blobs written before classes existed)."""
    return int(meta.get("classes", 1))


def class_map_size(meta: dict, n: int) -> int:
    """Entries of the class map: one per row or per column (0 with one table)."""
    if num_classes(meta) == 1:
        return 0
    cols = int(meta["cols"])
    return n // cols if meta["axis"] == "row" else n // int(meta["mrows"])


def pack_map(cmap: np.ndarray) -> np.ndarray:
    """Classes 0..3, four to a byte (entry i in bits 2·(i mod 4) of byte i // 4)."""
    c = np.zeros(-(-cmap.size // 4) * 4, np.uint8)
    c[: cmap.size] = cmap
    c = c.reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8)


def unpack_map(packed: torch.Tensor, entries: int) -> torch.Tensor:
    """The classes of a packed map (uint8, on the packed tensor's device)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed[: -(-entries // 4), None] >> shifts) & 3).reshape(-1)[:entries]


def section_sizes(meta: dict, n: int, itemsize: int) -> list[int]:
    """Byte sizes of the payload's sections: tables, class map, states, offsets, words, patches."""
    k = num_symbols(int(meta["radius"]), bool(meta["nudged"]))
    chunks = int(meta["chunks"])
    return [_pad4(2 * k * num_classes(meta)), _pad4(-(-class_map_size(meta, n) // 4)),
            4 * LANES * chunks,
            4 * chunks, _pad4(2 * int(meta["words"])),
            patches.section_nbytes(int(meta["patches"]), itemsize)]


class AnsCodec(Codec):
    """SZ3 quantization + interleaved rANS in chunks; CPU reference, Triton decoder on CUDA."""

    name = "ans"
    error_bounded = True
    gpu_decodable = True
    cpu_only = False
    description = ("SZ3 quantization (no predictor) + chunked interleaved rANS, decodes on GPU; "
                   "strict 1|0, classes 1|0 (a frequency table per class of rows or columns)")
    option_spec = {**patches.STRICT_OPTION, "classes": (1, (1, 0))}
    implicit_options = frozenset({"strict", "classes"})
    format_version = 2            # 2: per-class frequency tables and the class map section
    older_versions = (1,)

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
        present = symbol_counts(hist, radius, nudged) > 0
        chosen = choose_classes(x, code, table, present) if options.get("classes", 1) else None
        cmap, cls = np.zeros(0, np.uint8), None
        meta = {"lanes": LANES, "steps": STEPS, "prob_bits": PROB_BITS, "radius": int(radius),
                "nudged": int(nudged)}
        if chosen is not None:
            cls, freqs = chosen
            cmap = cls.cmap
            meta.update(classes=int(freqs.shape[0]), axis=cls.axis, cols=cls.cols,
                        mrows=cls.mrows)
        states, offsets, words = rans_encode(code, freqs, PROB_BITS, STEPS, table, MAX_RADIUS,
                                             cls)
        meta.update(chunks=int(offsets.size), words=int(words.size), patches=int(out_idx.size))
        parts = [freqs.astype("<u2").reshape(-1).view(np.uint8), pack_map(cmap),
                 states.astype("<u4").view(np.uint8),
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
    """The payload's six sections (tables, class map, states, offsets, words, patches) as uint8
    tensors.

    Raises:
        CodecError: the meta is malformed or the payload length does not match it.
    """
    try:
        sizes = section_sizes(meta, n, torch.empty((), dtype=dtype).element_size())
        steps, radius = int(meta["steps"]), int(meta["radius"])
        if (int(meta["lanes"]) != LANES or not 1 <= int(meta["prob_bits"]) <= 16 or steps < 1
                or not 0 <= radius <= MAX_RADIUS or not 1 <= num_classes(meta) <= 4):
            raise ValueError
        if num_classes(meta) > 1 and (meta["axis"] not in AXES or int(meta["cols"]) < 1
                                      or int(meta["cols"]) % LANES or int(meta["mrows"]) < 1
                                      or n % (int(meta["cols"]) * int(meta["mrows"]))):
            raise ValueError
    except (KeyError, TypeError, ValueError, ZeroDivisionError):   # cols or mrows 0
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
    """The symbol frequencies (int64 [classes, K]) from the table section (a CPU uint8 tensor)."""
    k = num_symbols(int(meta["radius"]), bool(meta["nudged"]))
    c = num_classes(meta)
    return table.numpy()[: 2 * k * c].view("<u2").astype(np.int64).reshape(c, k)


def classes_of(cmap: torch.Tensor, meta: dict, n: int) -> ClassMap | None:
    """The class map from its section (a CPU uint8 tensor); None with one table.

    Raises:
        ValueError: a class beyond the payload's tables.
    """
    if num_classes(meta) == 1:
        return None
    cols, mrows = int(meta["cols"]), int(meta["mrows"])
    m = unpack_map(cmap, class_map_size(meta, n)).numpy()
    if m.size and int(m.max()) >= num_classes(meta):
        raise ValueError(f"class {int(m.max())} in the class map, {num_classes(meta)} tables")
    return ClassMap(m, meta["axis"], mrows, cols)


def decode_cpu(table: torch.Tensor, cmap: torch.Tensor, states: torch.Tensor,
               offsets: torch.Tensor, words: torch.Tensor, patch: torch.Tensor, meta: dict,
               n: int, abs_bound: float, dtype: torch.dtype) -> torch.Tensor:
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
                           int(meta["steps"]), classes_of(cmap, meta, n))
    except ValueError as exc:
        raise CodecError(f"ans blob: {exc}; the blob is corrupt") from None
    signed = {1: np.uint8, 2: np.int16, 4: np.int32}[bits.itemsize]
    out = torch.from_numpy(bits.view(signed)).view(dtype)
    idx, pv = patches.unpack(patch, int(meta["patches"]), dtype, n)
    return patches.apply(out, idx, pv)


__all__ = ["AnsCodec", "quantize", "dequantize", "codes", "symbol_table", "choose_radius", "normalize",
           "rans_encode", "rans_decode", "value_table", "decode_cpu", "split", "choose_classes",
           "ClassMap", "LANES", "STEPS", "PROB_BITS"]
