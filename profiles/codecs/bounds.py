"""Error-bound modes and their resolution to one absolute bound per tensor.

Modes (value = the requested level):
  abs      bound = value
  rel      bound = value * (max - min) of the tensor         (SZ3's REL; one outlier sets it)
  meanabs  bound = value * mean |w| of the tensor            (the MoE-compression study's p)
  std      bound = value * standard deviation of the tensor  (population, ddof = 0)

The resolved bound is rounded DOWN to an fp32 value, because the cuSZp-format codecs compute in fp32:
the recorded `abs_bound` is exactly the bound applied. A bound that resolves to 0 (a constant tensor
under `rel`, an all-zero tensor under `meanabs`) or below the smallest normal fp32 means lossless
storage instead, recorded in the blob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from profiles.errors import BoundError, CodecError

BOUND_MODES = ("abs", "rel", "meanabs", "std")
F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
_PIECE = 1 << 20


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor (fp32 upcast), in the tensor's units."""

    numel: int
    max_abs: float
    mean_abs: float
    std: float
    value_range: float   # max - min


def check_request(mode: str, level) -> tuple[str, float]:
    """Validate a bound request; returns (mode, level as float).

    Raises:
        BoundError: unknown mode, or a level that is NaN, infinite, or <= 0.
    """
    if mode not in BOUND_MODES:
        raise BoundError(f"bound mode {mode!r} is unknown; valid: {', '.join(BOUND_MODES)}")
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise BoundError(f"bound level {level!r} is not a number; give a positive number "
                         f"such as 0.5 (meanabs) or 1e-3 (abs)") from None
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise BoundError(f"bound level {level!r} is invalid; it must be a finite number > 0 "
                         f"(e.g. 0.1 ... 0.8 for meanabs, 1e-4 ... 1e-2 for abs)")
    return mode, value


def tensor_stats(x: torch.Tensor, mode: str | None = None) -> TensorStats:
    """Statistics of a tensor's fp32 upcast; raises CodecError if it holds NaN or Inf.

    Works through CPU tensors in pieces of 2^20 values (small temporaries are much faster on CPU
    than whole-tensor ones); sums accumulate in float64.

    Args:
        x: values of any supported dtype, any device, any shape.
        mode: the bound mode whose statistic is needed besides max |x| (None: max |x| only).
    """
    n = x.numel()
    if n == 0:
        return TensorStats(0, 0.0, 0.0, 0.0, 0.0)
    flat = x.reshape(-1)
    step = _PIECE if flat.device.type == "cpu" else n
    lo_v, hi_v, abs_sum, total = math.inf, -math.inf, 0.0, 0.0
    for lo in range(0, n, step):
        p = flat[lo:lo + step].to(torch.float32)
        mn, mx = (float(v) for v in torch.aminmax(p))
        if not (math.isfinite(mn) and math.isfinite(mx)):
            raise CodecError(f"tensor of shape {tuple(x.shape)} holds NaN or Inf values; codecs "
                             f"only accept finite values (fix or mask them first)")
        lo_v, hi_v = min(lo_v, mn), max(hi_v, mx)
        if mode == "meanabs":
            abs_sum += float(p.abs().sum(dtype=torch.float64))
        elif mode == "std":
            total += float(p.sum(dtype=torch.float64))
    max_abs = max(abs(lo_v), abs(hi_v))
    std = math.nan
    if mode == "std":
        mean, sq = total / n, 0.0
        for lo in range(0, n, step):
            p = flat[lo:lo + step].to(torch.float64) - mean
            sq += float((p * p).sum())
        std = math.sqrt(sq / n)
    return TensorStats(n, max_abs, abs_sum / n if mode == "meanabs" else math.nan, std,
                       hi_v - lo_v)


def resolve(mode: str, level: float, stats: TensorStats) -> float:
    """The absolute bound (float64, before fp32 rounding) for a validated request."""
    scale = {"abs": 1.0, "rel": stats.value_range, "meanabs": stats.mean_abs, "std": stats.std}[mode]
    return level * scale


def floor_f32(bound: float) -> float:
    """The largest fp32 value <= bound (as a Python float)."""
    b32 = np.float32(bound)
    if float(b32) > bound:
        b32 = np.nextafter(b32, np.float32(0))
    return float(b32)


def lossless_reason(abs_bound: float, mode: str, level: float) -> str | None:
    """Why a resolved bound cannot be applied by an error-bounded codec, or None if it can."""
    if abs_bound == 0.0:
        return f"bound {mode}={level:g} resolves to 0 for this tensor (constant or all zeros)"
    if abs_bound < F32_MIN_NORMAL:
        return (f"bound {mode}={level:g} resolves to {abs_bound:.3g}, below the smallest normal "
                f"fp32 value")
    return None
