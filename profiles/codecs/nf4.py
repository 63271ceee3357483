"""`nf4`: 4-bit NormalFloat in blocks of 64 with double-quantized absmax, as bitsandbytes stores it.

QLoRA (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023) and bitsandbytes'
`quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`, the default of
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)`:

- blocks of 64 consecutive values of the flattened tensor; absmax a_b = max |x| per block;
- each value is x * (1 / a_b) (x / a_b in a partial last block, as bitsandbytes does), clamped to
  [-1, 1], coded as the nearest of the 16 NF4 levels (ties to the lower level); two codes per
  byte, the FIRST value in the HIGH nibble;
- double quantization (option `dq`, default true): offset = mean(a); the centred absmax
  (a - offset) is quantized in blocks of 256 with bitsandbytes' signed 8-bit dynamic map
  (nearest, ties to the lower code), storing one fp32 absmax per 256 blocks and the offset;
  `dq=false` stores every a_b as fp32 instead. bitsandbytes' CPU encoder finds the entry with an
  approximate table search (BinSearch "Direct2") that misses the nearest entry for about
  0.5 % of blocks (mostly one entry off, a few more near 0 where entries are dense); moesz takes
  the nearest, so those absmax bytes differ and every other byte is equal
  (tests/profiles/test_codecs_nf4.py).

Decoding, in fp32: a_b = DYNAMIC[qa_b] * absmax2_(b // 256) + offset; x = NF4[q] * a_b.

Payload, little-endian: with dq: offset fp32 | ceil(B / 256) fp32 absmax2 | B uint8 qa | codes;
without: B fp32 absmax | codes; B = ceil(n / 64), codes = ceil(n / 2) bytes. Bits per weight:
4 + 8/64 + 32/16384 = 4.127 with dq, 4.5 without (plus 32/n for the offset). The Triton kernel in
`nf4_triton` decodes the same bytes bit for bit; tests check encode and decode against
bitsandbytes itself where it installs.
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs.quantized import view_as

BLOCK = 64
DQ_BLOCK = 256
# bitsandbytes' NF4 levels (create_normal_map(0.9677083, use_extra_value=True)), as fp32
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`, 7 exponent bits), fp32 [256].

    Built the way bitsandbytes builds it (torch fp32 linspace and midpoints, scaled by powers of
    ten in Python floats); a test pins it against bitsandbytes and a checksum.
    """
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


_DYNAMIC = dynamic_map()


def num_blocks(n: int) -> int:
    return -(-n // BLOCK)


def payload_nbytes(n: int, dq: bool = True) -> int:
    b = num_blocks(n)
    codes = -(-n // 2)
    if dq:
        return 4 + 4 * -(-b // DQ_BLOCK) + b + codes
    return 4 * b + codes


def _absmax_and_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax fp32 [B], packed codes uint8 [ceil(n/2)]), as bitsandbytes' quantize_4bit."""
    n = x.numel()
    rem = n % BLOCK
    full = n - rem
    blocks = x[:full].reshape(-1, BLOCK)
    absmax = blocks.abs().max(dim=-1)[0] if full else x.new_zeros(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    levels = torch.tensor(NF4, dtype=torch.float32)
    q = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2, out_int32=True).to(torch.uint8)
    return absmax, (q[::2] << 4) | q[1::2]


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset fp32, absmax2 fp32 [C], qa uint8 [B]), as bitsandbytes' quantize_blockwise on CPU:
    nearest entry of the dynamic map to (a - offset) / absmax2, ties to the lower entry."""
    offset = absmax.mean()
    a = absmax - offset
    b = a.numel()
    pad = (-b) % DQ_BLOCK
    blocks = torch.nn.functional.pad(a, (0, pad)).reshape(-1, DQ_BLOCK)
    amax2 = blocks.abs().max(dim=1)[0]        # zero padding cannot raise a max of |a|
    safe = torch.where(amax2 > 0, amax2, torch.ones_like(amax2))
    normed = torch.where(amax2[:, None] > 0, blocks / safe[:, None], 0.0).reshape(-1)[:b]
    code = _DYNAMIC
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 255)
    right = (left + 1).clamp(max=255)
    take_right = (normed - code[right]).abs() < (normed - code[left]).abs()
    return offset, amax2, torch.where(take_right, right, left).to(torch.uint8)


def encode(x: np.ndarray, dq: bool = True) -> np.ndarray:
    """The payload (uint8) of flat fp32 values; layout in the module docstring."""
    absmax, codes = _absmax_and_codes(torch.from_numpy(x))
    if not dq:
        return np.concatenate([absmax.numpy().view(np.uint8), codes.numpy()])
    offset, amax2, qa = _double_quantize(absmax)
    return np.concatenate([offset.reshape(1).numpy().view(np.uint8),
                           amax2.numpy().view(np.uint8), qa.numpy(), codes.numpy()])


def block_absmax(payload: torch.Tensor, n: int, dq: bool = True) -> tuple[torch.Tensor, int]:
    """(absmax fp32 [B] on the payload's device, byte offset of the codes)."""
    b = num_blocks(n)
    if not dq:
        return view_as(payload, 0, b, torch.float32), 4 * b
    c = -(-b // DQ_BLOCK)
    offset = view_as(payload, 0, 1, torch.float32)
    amax2 = view_as(payload, 4, c, torch.float32)
    qa = payload[4 + 4 * c:4 + 4 * c + b].to(torch.int64)
    code = _DYNAMIC.to(payload.device)
    scaled = torch.nn.functional.pad(code[qa], (0, c * DQ_BLOCK - b)).reshape(c, DQ_BLOCK)
    return (scaled * amax2[:, None]).reshape(-1)[:b] + offset, 4 + 4 * c + b


def decode(payload: torch.Tensor, n: int, dq: bool = True) -> torch.Tensor:
    """n fp32 values from a payload (uint8 tensor on any device): NF4[q] * absmax."""
    absmax, start = block_absmax(payload, n, dq)
    packed = payload[start:].to(torch.int64)
    q = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    b = absmax.numel()
    q = torch.nn.functional.pad(q[:n], (0, b * BLOCK - n))
    levels = torch.tensor(NF4, dtype=torch.float32, device=payload.device)
    return (levels[q].reshape(b, BLOCK) * absmax[:, None]).reshape(-1)[:n]


__all__ = ["BLOCK", "DQ_BLOCK", "NF4", "dynamic_map", "payload_nbytes", "encode", "decode",
           "block_absmax"]
