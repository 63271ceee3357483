"""Tensor dtypes a codec accepts, their short names, and the exact conversions to and from fp32.

Every codec sees its input as an fp32 upcast, which is exact for bf16, fp16 and fp8 e4m3. Ratios are
always computed against the ORIGINAL dtype's bytes (bf16: 2 per value, fp8: 1), never the upcast.
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.errors import CodecError

#: short name -> torch dtype, in the order they are listed to users.
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3": torch.float8_e4m3fn,
}
_NAME_OF = {dt: name for name, dt in DTYPES.items()}
_NUMPY_TO_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a supported torch dtype (`"bf16"`, ...); raises CodecError for others."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise CodecError(f"tensor dtype {dtype} is not supported; use one of "
                         f"{', '.join(DTYPES)} (bfloat16, float16, float32, float8_e4m3fn)") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a short name; raises CodecError for an unknown name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CodecError(f"dtype {name!r} is unknown; valid: {', '.join(DTYPES)}") from None


def itemsize(name: str) -> int:
    """Bytes per value of the original dtype (bf16: 2, fp8_e4m3: 1)."""
    return torch.empty((), dtype=torch_dtype(name)).element_size()


def as_torch(tensor) -> torch.Tensor:
    """A contiguous torch tensor of a supported dtype viewing or copying `tensor` (torch or numpy).

    numpy arrays may be float16, float32, or ml_dtypes' bfloat16; torch tensors any supported dtype.
    Non-contiguous views are copied to contiguous memory (values unchanged).

    Raises:
        CodecError: the input is not a tensor/array or has an unsupported dtype.
    """
    if isinstance(tensor, torch.Tensor):
        t = tensor.detach()
    elif isinstance(tensor, np.ndarray):
        arr = np.ascontiguousarray(tensor)
        if arr.dtype.name == "bfloat16":  # ml_dtypes bfloat16: same bits as torch.bfloat16
            t = torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        elif arr.dtype in _NUMPY_TO_TORCH:
            t = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)
        else:
            raise CodecError(f"numpy array dtype {arr.dtype} is not supported; use float16, float32 "
                             f"or bfloat16 (or a torch tensor of {', '.join(DTYPES)})")
    else:
        raise CodecError(f"expected a torch tensor or numpy array, got {type(tensor).__name__}")
    dtype_name(t.dtype)
    return t.contiguous()


def cast_back(x32: torch.Tensor, name: str) -> torch.Tensor:
    """Round fp32 values to the original dtype (round to nearest even), saturating at its range.

    The original values lie inside the dtype's finite range, so clamping first never increases the
    error; it only keeps a decoded value that overshoots the largest finite value from becoming
    inf (fp16) or NaN (fp8 e4m3).
    """
    dt = torch_dtype(name)
    if dt == torch.float32:
        return x32
    if dt in (torch.float16, torch.float8_e4m3fn):
        fmax = float(torch.finfo(dt).max)
        x32 = x32.clamp(-fmax, fmax)
    return x32.to(dt)
