"""Helpers shared by the codec tests: dtype spacing and the guarantee of issue 2."""

from __future__ import annotations

import math

import numpy as np
import torch

# mantissa bits, smallest normal exponent
_FORMAT = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126),
           torch.float8_e4m3fn: (3, -6)}


def ulp(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Spacing of `dtype` values at magnitude |v| (float64)."""
    m, emin = _FORMAT[dtype]
    a = np.abs(np.asarray(v, dtype=np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.where(a > 0, np.maximum(e, emin), emin)
    return np.exp2(e - m)


def near_gap(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Gap from x to its nearer neighbour in `dtype` (smaller below a power of two)."""
    m, emin = _FORMAT[dtype]
    a = np.abs(x.astype(np.float64))
    g = ulp(a, dtype)
    with np.errstate(divide="ignore"):
        pow2 = (a > 0) & (np.exp2(np.floor(np.log2(np.where(a > 0, a, 1.0)))) == a)
    below = pow2 & (a > math.ldexp(1.0, emin))
    return np.where(below, g / 2, g)


def guarantee(x: torch.Tensor, y: torch.Tensor, abs_bound: float) -> tuple[np.ndarray, np.ndarray]:
    """(|y - x|, allowed) per element, allowed = bound + |x|·2^-22 + half a dtype gap."""
    xd = x.to(torch.float64).reshape(-1).numpy()
    yd = y.to(torch.float64).reshape(-1).numpy()
    err = np.abs(yd - xd)
    core = abs_bound + np.abs(xd) * 2.0 ** -22
    half = 0.0 if x.dtype == torch.float32 else 0.5 * ulp(np.abs(xd) + core, x.dtype)
    return err, core + half


def exact_where_expected(x: torch.Tensor, y: torch.Tensor, abs_bound: float) -> np.ndarray:
    """Boolean mask of elements that must come back exactly (bf16/fp16/fp8 originals)."""
    xd = x.to(torch.float64).reshape(-1).numpy()
    core = abs_bound + np.abs(xd) * 2.0 ** -22
    return core < near_gap(xd, x.dtype) / 2
