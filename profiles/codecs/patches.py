"""Strict error bounds: the elements a codec's rounded reconstruction misses, stored exactly.

Error-bounded codecs quantize in fp32 and round the result back to the tensor's dtype; that rounding
can add up to half a dtype ulp to the error (about 0.016 at |w| = 4 in bf16). Under the strict bound
(the default, option `strict=1`) the encoder computes the reconstruction exactly as the decoder
will, rounded to the original dtype, and stores every element with |x̂ − x| > bound as a PATCH: its
flat index and its original value. Decoders write the bulk of the tensor first and then apply all
patches with one scatter, on the CPU or the GPU alike. `strict=0` keeps the relaxed guarantee
(docs/codecs.md) and stores no violators.

Patch section layout (little-endian), appended to a codec's payload:

    P uint32 flat indices, ascending
    P values in the original dtype (raw bits), then zero padding to a multiple of 4 bytes
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from profiles.errors import CodecError

STRICT_OPTION = {"strict": (1, (1, 0))}
_PIECE = 1 << 20


def is_strict(options: dict[str, Any]) -> bool:
    """Whether the options ask for the strict bound (the default when `strict` is absent)."""
    return bool(options.get("strict", 1))


def violators(x: torch.Tensor, reconstruct: Callable[[int, torch.Tensor], torch.Tensor],
              bound: float) -> torch.Tensor:
    """Flat int64 indices (ascending, on x's device) where |reconstruct(x) − x| > bound exactly.

    Args:
        x: the original values (any supported dtype, any shape, CPU or CUDA).
        reconstruct: maps (offset, flat piece of x) to what the decoder returns for that piece
            (same dtype).
        bound: the absolute bound, compared in float64 (exact for the differences of fp32 values
            that are close to each other, which is every case where it matters).
    """
    flat = x.reshape(-1)
    n = flat.numel()
    step = _PIECE if flat.device.type == "cpu" else (1 << 26)
    found = []
    for lo in range(0, n, step):
        piece = flat[lo:lo + step]
        err = (reconstruct(lo, piece).to(torch.float64) - piece.to(torch.float64)).abs_()
        hit = torch.nonzero(err > bound).reshape(-1)
        if hit.numel():
            found.append(hit + lo)
    if not found:
        return torch.zeros(0, dtype=torch.int64, device=flat.device)
    return torch.cat(found)


def section_nbytes(count: int, itemsize: int) -> int:
    """Bytes of a patch section of `count` patches of `itemsize`-byte values."""
    raw = count * (4 + itemsize)
    return raw + (-raw) % 4


def pack(indices: torch.Tensor | np.ndarray, x: torch.Tensor) -> np.ndarray:
    """The patch section for `indices` (ascending) of tensor x, as a uint8 numpy array."""
    idx = torch.as_tensor(indices).reshape(-1).to(device=x.device, dtype=torch.int64)
    if idx.numel() and int(idx.max()) >= 1 << 32:
        raise CodecError("a tensor of 2^32 or more values cannot hold patches; split it")
    vals = x.reshape(-1)[idx].contiguous().view(torch.uint8).cpu().numpy()
    out = np.zeros(section_nbytes(idx.numel(), x.element_size()), dtype=np.uint8)
    k = 4 * idx.numel()
    out[:k] = idx.cpu().numpy().astype("<u4").view(np.uint8)
    out[k:k + vals.size] = vals
    return out


def unpack(section: torch.Tensor, count: int, dtype: torch.dtype,
           numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 indices, values of `dtype`) from a uint8 patch section tensor (any device).

    Raises:
        CodecError: the section has the wrong length or an index past the tensor's end.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if section.numel() != section_nbytes(count, itemsize):
        raise CodecError(f"patch section of {section.numel()} bytes, expected "
                         f"{section_nbytes(count, itemsize)} for {count} patches; the blob is corrupt")
    k = 4 * count
    idx = section[:k].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    vals = section[k:k + count * itemsize].view(dtype)
    if count and int(idx.max()) >= numel:
        raise CodecError(f"patch index {int(idx.max())} is past the tensor's {numel} values; the "
                         f"blob is corrupt")
    return idx, vals


def apply(out: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Write the patches into the flat tensor `out` with one scatter; returns `out`."""
    if idx.numel():
        width = _INT_OF_SIZE[out.element_size()]       # bits: fp8 has no index_copy on the CPU
        out.reshape(-1).view(width).index_copy_(0, idx.to(out.device),
                                                vals.to(out.device).view(width))
    return out


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
