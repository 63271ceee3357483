"""Reference numpy implementation of the cuSZp v3 1-D fp32 stream (fixed and plain modes).

This module is the definition the torch and Triton implementations are tested against, byte for
byte. It follows the kernels of cuSZp v3 (szcompressor/cuSZp, `cuSZp_kernels_1D_f32.cu`; Huang et
al., "cuSZp: An Ultra-fast GPU Error-bounded Lossy Compression Framework", SC'23):

* quantization in fp32: d = x * (0.5 / eb); q = trunc(d + 0.5) - (d < -0.5); decode (q * eb) * 2;
* blocks of 32 values; `plain` mode replaces q by its delta to the previous value in the block
  (the first value keeps q), `fixed` mode stores q itself; padding past the end counts as zero;
* the rate area: one byte per block (bit width of the block's max |value|), for a block count
  rounded up to a multiple of 1024 blocks (32768 values), unused bytes zero;
* then, in block order, each block with rate r > 0: a 4-byte sign word (value i at bit 31 - i,
  most significant byte first) and r bit planes of |value|, lowest plane first, 4 bytes each with
  the same value-to-bit order. Compressed size = rate area + sum over non-zero blocks of 4 + 4r.

moesz adds a chunk index next to the stream (not inside it): one uint32 per 1024-block chunk giving
the byte offset of the chunk's first block in the data area, so a GPU decoder needs no prefix sum.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32                     # values per block
CHUNK_BLOCKS = 1024            # blocks per rate-area padding unit and per index entry
CHUNK_VALUES = BLOCK * CHUNK_BLOCKS
VARIANTS = ("fixed", "plain")
#: quantized magnitudes must stay below this so that plain-mode deltas fit in int32.
SATURATION_LIMIT = float(1 << 30)


def num_blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def rate_area_nbytes(n: int) -> int:
    """Bytes of the rate area for n values: the block count rounded up to 1024 blocks."""
    chunks = (num_blocks(n) + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
    return chunks * CHUNK_BLOCKS


def num_chunks(n: int) -> int:
    return rate_area_nbytes(n) // CHUNK_BLOCKS


def recip_precision(eb: float) -> np.float32:
    """0.5 / eb computed in fp32, as the kernel does."""
    return np.float32(0.5) / np.float32(eb)


def quantize(x32: np.ndarray, eb: float) -> np.ndarray:
    """int32 quantization codes of fp32 values (caller guarantees |x| * 0.5/eb < 2^30)."""
    d = x32.astype(np.float32, copy=False) * recip_precision(eb)
    q = (d + np.float32(0.5)).astype(np.int32)          # C cast: truncation toward zero
    return q - (d < np.float32(-0.5)).astype(np.int32)


def dequantize(q: np.ndarray, eb: float) -> np.ndarray:
    return (q.astype(np.float32) * np.float32(eb)) * np.float32(2.0)


def _block_values(x32: np.ndarray, eb: float, variant: str) -> np.ndarray:
    """[nblocks, 32] int32 values to encode (q or in-block deltas), zero past the end."""
    n = x32.size
    nb = num_blocks(n)
    q = np.zeros(nb * BLOCK, dtype=np.int32)
    q[:n] = quantize(x32.ravel(), eb)
    q = q.reshape(nb, BLOCK)
    if variant == "plain":
        v = q.copy()
        v[:, 1:] -= q[:, :-1]
        v.reshape(-1)[n:] = 0     # cuSZp zeroes padded positions, it does not take their delta
        return v
    return q


def bit_width(amax: np.ndarray) -> np.ndarray:
    """Bits needed for each non-negative int (32 - clz), as uint8."""
    out = np.zeros(amax.shape, dtype=np.uint8)
    a = amax.astype(np.int64)
    for k in range(32):
        out += (a >= (1 << k)).astype(np.uint8)
    return out


def encode(x32: np.ndarray, eb: float, variant: str = "fixed") -> tuple[np.ndarray, np.ndarray]:
    """Compress fp32 values to a cuSZp v3 stream.

    Args:
        x32: fp32 values, any shape (flattened in C order).
        eb: absolute error bound, an fp32 value > 0.
        variant: "fixed" (no prediction) or "plain" (in-block delta).

    Returns:
        (stream, index): the uint8 stream and the uint32 chunk index.
    """
    n = x32.size
    v = _block_values(x32, eb, variant)
    nb = v.shape[0]
    neg = v < 0
    a = np.abs(v)
    rates = bit_width(a.max(axis=1)) if nb else np.zeros(0, np.uint8)
    rate_area = np.zeros(rate_area_nbytes(n), dtype=np.uint8)
    rate_area[:nb] = rates
    parts = [rate_area]
    sizes = np.where(rates > 0, 4 + 4 * rates.astype(np.int64), 0)
    signs = np.packbits(neg, axis=1)                       # [nb, 4], value 0 -> bit 7 of byte 0
    for b in np.flatnonzero(rates):
        planes = (a[b][None, :] >> np.arange(rates[b])[:, None]) & 1     # [r, 32], lowest first
        parts.append(signs[b])
        parts.append(np.packbits(planes.astype(np.uint8), axis=1).ravel())
    stream = np.concatenate(parts) if len(parts) > 1 else rate_area
    return stream, chunk_index(sizes, n)


def chunk_index(sizes: np.ndarray, n: int) -> np.ndarray:
    """uint32 data-area offset of the first block of every 1024-block chunk."""
    padded = np.zeros(rate_area_nbytes(n), dtype=np.int64)
    padded[: sizes.size] = sizes
    per_chunk = padded.reshape(-1, CHUNK_BLOCKS).sum(axis=1)
    return (np.cumsum(per_chunk) - per_chunk).astype(np.uint32)


def stream_nbytes(rates: np.ndarray, n: int) -> int:
    """Compressed size implied by the block rates."""
    r = rates.astype(np.int64)
    return rate_area_nbytes(n) + int(np.where(r > 0, 4 + 4 * r, 0).sum())


def decode(stream: np.ndarray, n: int, eb: float, variant: str = "fixed") -> np.ndarray:
    """Decompress a cuSZp v3 stream to n fp32 values (the index is not needed here)."""
    nb = num_blocks(n)
    stream = np.asarray(stream, dtype=np.uint8)
    rates = stream[:nb].astype(np.int64)
    if stream.size != stream_nbytes(rates, n):
        raise ValueError(f"szp stream has {stream.size} bytes, its rates imply "
                         f"{stream_nbytes(rates, n)}")
    out = np.zeros((nb, BLOCK), dtype=np.int32)
    pos = rate_area_nbytes(n)
    for b in np.flatnonzero(rates):
        r = int(rates[b])
        neg = np.unpackbits(stream[pos:pos + 4]).astype(bool)
        planes = np.unpackbits(stream[pos + 4:pos + 4 + 4 * r].reshape(r, 4), axis=1)
        a = (planes.astype(np.int64) << np.arange(r)[:, None]).sum(axis=0)
        v = np.where(neg, -a, a).astype(np.int32)
        out[b] = np.cumsum(v, dtype=np.int32) if variant == "plain" else v
        pos += 4 + 4 * r
    return dequantize(out.reshape(-1)[:n], eb)
