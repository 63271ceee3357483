"""`mxfp4`: OCP Microscaling MXFP4 — 32 values share an e8m0 scale, each value is e2m1.

OCP Microscaling Formats (MX) Specification v1.0 (2023): a block of 32 consecutive values of the
flattened tensor stores one 8-bit power-of-two scale X = 2^(E - 127) and 32 FP4 e2m1 elements P
(sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6); a value decodes to X * P.
Bytes are laid out as GGUF's `block_mxfp4` (llama.cpp, and gpt-oss's `*_blocks`/`*_scales` hold
the same nibbles): per block 17 bytes, E then 16 bytes whose low nibble is element j and high
nibble element j + 16, nibble = e2m1 code (bit 3 = sign). 4.25 bits per weight; a partial last
block is padded with zeros and stored whole.

How E is chosen (option `scale`):

- `ocp` (default): the spec's conversion (section 6.3): E - 127 = floor(log2(max |x|)) - 2
  (2 = the largest e2m1 exponent), elements x / X rounded to the nearest e2m1 value, ties to
  even, clamped to +-6 (so the block maximum can lose up to a quarter of its magnitude).
- `llamacpp`: llama.cpp's `quantize_row_mxfp4_ref` (and `gguf.quants.quantize`): the same
  exponent computed with float32 `log2`, each element the nearest of the 16 codes with ties to
  the lower code (toward zero). Bytes equal gguf's bit for bit.
- `ceil`: the smallest E with max |x| <= 6 X, so nothing is clamped (the round-up rule of
  NVIDIA's MX training recipes); ties to even like `ocp`.

gpt-oss checkpoints (`*_blocks` uint8 [E, out, in/32, 16] and `*_scales` e8m0 uint8
[E, out, in/32], as transformers' `convert_moe_packed_tensors` reads them) hold the same codes and
exponents in another order: the 32 values of a block run along the input dimension of an
[out, in] matrix, and byte k holds element 2k in its low nibble and element 2k + 1 in its high
nibble. `to_gpt_oss` and `decode_gpt_oss` convert between that layout and values; the decode
equals transformers' dequantization bit for bit (e2m1 value times 2^(E - 127), exact in bf16).

Blocks whose max |x| is below 2^-125 (fp32 subnormals) get E = 0 under every rule, where
llama.cpp's cast of a negative exponent to uint8 is undefined; decoded values are equal.
The Triton kernel in `mxfp4_triton` decodes the same bytes bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
BLOCK_NBYTES = 17
RULES = ("ocp", "llamacpp", "ceil")
# e2m1 code -> value doubled (GGUF's kvalues_mxfp4); codes 8-15 are the negatives
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
# magnitude boundaries between e2m1 values, and whether a tie there goes up (to the even mantissa)
# e2m1 code -> value, code 8 being -0.0 (transformers' FP4_VALUES, so decodes agree in every bit)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
_TIE_UP = np.array([False, True, False, True, False, True, False])
_CHUNK_BLOCKS = 1 << 15


def num_blocks(n: int) -> int:
    return -(-n // BLOCK)


def payload_nbytes(n: int, scale: str = "ocp") -> int:
    """17 bytes per block of 32 values (a partial last block counts whole)."""
    return BLOCK_NBYTES * num_blocks(n)


def _exponents(amax: np.ndarray, rule: str) -> np.ndarray:
    """The stored exponent byte E (uint8) for each block's max |x| (fp32)."""
    if rule == "llamacpp":
        with np.errstate(divide="ignore"):
            e = np.floor(np.log2(amax)) - 2 + 127           # float32, as llama.cpp/gguf do it
        e = np.where(amax > 0, e, 0)
    else:
        m, k = np.frexp(amax.astype(np.float64))            # amax = m 2^k, m in [0.5, 1)
        e = (k - 1) - 2 + 127
        if rule == "ceil":
            e = e + (m > 0.75)                              # m * 8 > 6: one step up
        e = np.where(amax > 0, e, 0)
    return np.clip(e, 0, 254).astype(np.uint8)


def _nearest_even(v: np.ndarray) -> np.ndarray:
    """e2m1 codes of values already divided by X: nearest, ties to even, clamped to +-6."""
    a = np.abs(v)
    mag = np.zeros(a.shape, np.uint8)
    for b, up in zip(_BOUNDS, _TIE_UP):
        mag += (a >= b) if up else (a > b)
    return mag | ((v < 0) << 3).astype(np.uint8)


def _nearest_llamacpp(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """llama.cpp's best_index_mxfp4: argmin |k d - x| over the codes, first (lowest) on ties."""
    kv = np.array(KVALUES, np.float32)
    best = np.zeros(x.shape, np.uint8)
    best_err = np.abs(kv[0] * d - x)
    for i in range(1, 16):
        err = np.abs(kv[i] * d - x)
        better = err < best_err
        best[better] = i
        best_err = np.where(better, err, best_err)
    return best


def encode(x: np.ndarray, scale: str = "ocp") -> np.ndarray:
    """The payload (uint8) of flat fp32 values; layout in the module docstring."""
    nb = num_blocks(x.size)
    xb = np.zeros(nb * BLOCK, np.float32)
    xb[:x.size] = x
    xb = xb.reshape(nb, BLOCK)
    out = np.empty((nb, BLOCK_NBYTES), np.uint8)
    for lo in range(0, nb, _CHUNK_BLOCKS):
        blk = xb[lo:lo + _CHUNK_BLOCKS]
        e = _exponents(np.abs(blk).max(axis=1), scale)
        if scale == "llamacpp":
            codes = _nearest_llamacpp(blk, e8m0_half(e)[:, None])
        else:
            # x / X = x * 2^(127 - E): exact (a power of two; X >= 2^-127 keeps it finite)
            codes = _nearest_even(blk * np.ldexp(np.float32(1), 127 - e.astype(np.int32))[:, None])
        out[lo:lo + _CHUNK_BLOCKS, 0] = e
        out[lo:lo + _CHUNK_BLOCKS, 1:] = codes[:, :16] | (codes[:, 16:] << 4)
    return out.reshape(-1)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """X / 2 as fp32 for exponent bytes E (GGUF's e8m0_to_fp32_half), bit-exact."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def decode(payload: torch.Tensor, n: int, scale: str = "ocp") -> torch.Tensor:
    """n fp32 values from a payload (uint8 tensor on any device): KVALUES[code] * X / 2."""
    blocks = payload.reshape(-1, BLOCK_NBYTES)
    e = blocks[:, 0].to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    d = bits.view(torch.float32)
    qs = blocks[:, 1:].to(torch.int64)
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=1)                       # [blocks, 32]
    kv = torch.tensor(KVALUES, dtype=torch.float32, device=payload.device)
    return (d[:, None] * kv[codes]).reshape(-1)[:n]


def to_gpt_oss(w: np.ndarray, scale: str = "ocp") -> tuple[np.ndarray, np.ndarray]:
    """gpt-oss's (blocks, scales) of a matrix `w` [out, in] (fp32, in a multiple of 32): blocks
    uint8 [out, in/32, 16], scales uint8 [out, in/32] (the e8m0 exponent byte E)."""
    out_dim, in_dim = w.shape
    if in_dim % BLOCK:
        raise ValueError(f"gpt-oss MXFP4 needs an input dimension divisible by {BLOCK}, got {in_dim}")
    g = in_dim // BLOCK
    payload = encode(np.ascontiguousarray(w, np.float32).reshape(-1), scale).reshape(-1, BLOCK_NBYTES)
    qs = payload[:, 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)                  # [blocks, 32]
    blocks = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return blocks.reshape(out_dim, g, 16), payload[:, 0].reshape(out_dim, g).copy()


def decode_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The matrix [in, out] (transposed, as transformers holds gpt-oss experts in memory) of
    gpt-oss MXFP4 `blocks` uint8 [out, G, 16] and `scales` uint8 [out, G]: e2m1 value of each
    nibble (low nibble first) times 2^(E - 127), computed as transformers does it."""
    out_dim, g, nb = blocks.shape
    lut = torch.tensor(E2M1_VALUES, dtype=dtype)
    b = blocks.reshape(-1, nb)
    vals = torch.empty(b.shape[0], 2 * nb, dtype=dtype)
    vals[:, 0::2] = lut[(b & 0x0F).long()]
    vals[:, 1::2] = lut[(b >> 4).long()]
    torch.ldexp(vals, scales.reshape(-1, 1).to(torch.int32) - 127, out=vals)
    return vals.reshape(out_dim, g * 2 * nb).t().contiguous()


__all__ = ["BLOCK", "BLOCK_NBYTES", "RULES", "KVALUES", "payload_nbytes", "encode", "decode",
           "e8m0_half", "to_gpt_oss", "decode_gpt_oss"]
