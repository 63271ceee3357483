"""`gq`: group-wise asymmetric min-max quantization with an fp16 scale and zero per group.

The storage format of GPTQ and HQQ checkpoints (mixtral-offloading ships its experts in HQQ's):
consecutive values of the flattened tensor form groups of `group` values (for a row-major
`[out, in]` weight, groups run along the input dimension, as both store them); each group keeps
an fp16 scale s and an fp16 zero z and each value a `bits`-bit code q:

    range  lo = min(min(group), 0), hi = max(max(group), 0)      (GPTQ's range, 0 always inside)
    s      = fp16((hi - lo) / (2^bits - 1)),  z = fp16(-lo / s)   (z in [0, 2^bits - 1])
    q      = clamp(round_half_even(x / s + z), 0, 2^bits - 1)     (fp32, with the fp16 s and z)
    decode = (q - z) * s                                          (fp32, then the original dtype)

A zero range or an fp16 scale that underflows to 0 stores s = z = 0 (the group decodes to 0); a
scale or zero beyond fp16's range saturates at 65504. The zero is kept as an fp16 number, not
rounded to an integer (HQQ keeps it that way; GPTQ rounds it).

Payload, little-endian:

    G = ceil(n / group) fp16 scales | G fp16 zeros | codes: a bit stream of n * bits bits, value i
    at bits [i*bits, (i+1)*bits), least significant bit first, padded to whole bytes

so a weight costs bits + 32 / group bits (4-bit, group 64: 4.5). A partial last group is shorter,
not padded. The Triton kernel in `gq_triton` decodes the same bytes bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs.quantized import view_as

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
FP16_MAX = 65504.0


def num_groups(n: int, group: int) -> int:
    return -(-n // group)


def payload_nbytes(n: int, bits: int = 4, group: int = 64) -> int:
    """Bytes stored for n values: 4 per group (scale, zero) plus the packed codes."""
    return 4 * num_groups(n, group) + -(-n * bits // 8)


def quantize(x: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [n], fp16 scales [G], fp16 zeros [G]) of flat fp32 values."""
    n = x.size
    g = num_groups(n, group)
    qmax = np.float32(2 ** bits - 1)
    xb = np.zeros(g * group, np.float32)
    xb[:n] = x                         # zero padding leaves min(., 0) and max(., 0) unchanged
    xb = xb.reshape(g, group)
    lo = np.minimum(xb.min(axis=1), np.float32(0))
    hi = np.maximum(xb.max(axis=1), np.float32(0))
    with np.errstate(over="ignore"):
        scale = np.minimum((hi - lo) / qmax, np.float32(FP16_MAX))
    s16 = scale.astype(np.float16)
    s = s16.astype(np.float32)
    ok = s > 0
    safe = np.where(ok, s, np.float32(1))
    z16 = np.where(ok, np.minimum((0 - lo) / safe, np.float32(FP16_MAX)), 0).astype(np.float16)
    z = z16.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint(xb / safe[:, None] + z[:, None])
    q = np.where(ok[:, None], np.clip(q, 0, qmax), 0).astype(np.uint8)
    return q.reshape(-1)[:n], s16, np.where(ok, z16, np.float16(0))


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (uint8, each < 2^bits) as a little-endian bit stream of ceil(n * bits / 8) bytes."""
    if bits == 8:
        return codes.astype(np.uint8)
    planes = np.unpackbits(codes.reshape(-1, 1), axis=1, count=bits, bitorder="little")
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(stream: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The n codes (int32) of a bit stream written by `pack_bits`, on the stream's device."""
    s = stream.to(torch.int32)
    if bits == 8:
        return s[:n]
    if bits in (2, 4):
        shifts = torch.arange(0, 8, bits, device=s.device, dtype=torch.int32)
        return ((s[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:n]
    # 3 bits: every 3 bytes hold 8 codes
    pad = (-s.numel()) % 3
    if pad:
        s = torch.cat([s, s.new_zeros(pad)])
    w = s.reshape(-1, 3)
    word = w[:, 0] | (w[:, 1] << 8) | (w[:, 2] << 16)
    shifts = torch.arange(0, 24, 3, device=s.device, dtype=torch.int32)
    return ((word[:, None] >> shifts) & 7).reshape(-1)[:n]


def encode(x: np.ndarray, bits: int = 4, group: int = 64) -> np.ndarray:
    """The payload (uint8) of flat fp32 values; layout in the module docstring."""
    codes, s16, z16 = quantize(x, bits, group)
    return np.concatenate([s16.view(np.uint8), z16.view(np.uint8), pack_bits(codes, bits)])


def decode(payload: torch.Tensor, n: int, bits: int = 4, group: int = 64) -> torch.Tensor:
    """n fp32 values from a payload (uint8 tensor on any device): (q - z) * s."""
    g = num_groups(n, group)
    s = view_as(payload, 0, g, torch.float16).to(torch.float32)
    z = view_as(payload, 2 * g, g, torch.float16).to(torch.float32)
    q = unpack_bits(payload[4 * g:], n, bits).to(torch.float32)
    if g * group != n:
        q = torch.cat([q, q.new_zeros(g * group - n)])
    out = (q.reshape(g, group) - z[:, None]) * s[:, None]
    return out.reshape(-1)[:n]


__all__ = ["BITS", "GROUPS", "payload_nbytes", "quantize", "encode", "decode", "pack_bits",
           "unpack_bits"]
