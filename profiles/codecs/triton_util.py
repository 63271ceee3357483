"""What every Triton dequantization kernel of the quantized formats needs: whether Triton can run
here, launch options that keep fp32 arithmetic exactly as the CPU reference does it, and the final
cast to the original dtype."""

from __future__ import annotations

import os

import torch


def available() -> tuple[bool, str]:
    """(True, "") if Triton can run here: a CUDA device, or the CPU interpreter when requested."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install 'moesz[gpu]')"
    if torch.cuda.is_available() or interpreting():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_opts() -> dict:
    """No fused multiply-add: the CPU reference rounds every product and sum on its own."""
    return {} if interpreting() else {"enable_fp_fusion": False}


def kernel_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes: bf16/fp16 directly on a GPU; fp32 otherwise (the interpreter
    truncates fp32 -> bf16/fp16 instead of rounding, and fp8 is rounded from fp32 afterwards)."""
    if out_dtype in (torch.bfloat16, torch.float16) and not interpreting():
        return out_dtype
    return torch.float32


def finish(out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Round a kernel's fp32 output to `out_dtype` as `dtypes.cast_back` does (saturating)."""
    if out.dtype == out_dtype:
        return out
    if out_dtype in (torch.float16, torch.float8_e4m3fn):
        fm = float(torch.finfo(out_dtype).max)
        out = out.clamp_(-fm, fm)
    return out.to(out_dtype)
