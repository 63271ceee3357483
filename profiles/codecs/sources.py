"""Tensors to benchmark codecs on: files (safetensors, npy) or seeded random weights.

Random weights model trained LLM weights at σ = 0.02 (the scale of the REFERENCE size table):
`gaussian`; `laplace` (b = σ/√2, same σ); `student-t` (ν = 3 scaled by σ/√3: heavy tails like
real down-projections, whose kurtosis reaches hundreds).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from profiles.codecs.dtypes import DTYPES, as_torch, torch_dtype
from profiles.errors import CodecError

DISTRIBUTIONS = ("gaussian", "laplace", "student-t")
SIGMA = 0.02


def parse_shape(text: str) -> tuple[int, ...]:
    """'4096x1024' -> (4096, 1024); raises CodecError on anything else."""
    try:
        shape = tuple(int(p) for p in text.lower().replace("*", "x").split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise CodecError(f"shape {text!r} is invalid; write positive sizes joined by 'x', "
                         f"e.g. 4096x1024")
    return shape


def random_tensor(dist: str, shape: tuple[int, ...], dtype: str = "bf16", seed: int = 0,
                  sigma: float = SIGMA) -> torch.Tensor:
    """Seeded random weights of standard deviation `sigma`, rounded to `dtype`."""
    if dist not in DISTRIBUTIONS:
        raise CodecError(f"random distribution {dist!r} is unknown; valid: "
                         f"{', '.join(DISTRIBUTIONS)}")
    dt = torch_dtype(dtype)
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if dist == "gaussian":
        v = rng.standard_normal(n, dtype=np.float32) * sigma
    elif dist == "laplace":
        v = rng.laplace(0.0, sigma / math.sqrt(2.0), n).astype(np.float32)
    else:
        v = (rng.standard_t(3, n) * (sigma / math.sqrt(3.0))).astype(np.float32)
    return torch.from_numpy(v).reshape(shape).to(dt)


def load_tensors(spec: str) -> list[tuple[str, torch.Tensor]]:
    """Tensors from `FILE.safetensors[:NAME]` or `FILE.npy` as (name, tensor) pairs.

    Without `:NAME` every floating-point tensor of a supported dtype in the file is returned.

    Raises:
        CodecError: missing file, unknown suffix, unknown tensor name, unsupported dtype.
    """
    path_text, _, name = spec.partition(":") if ".safetensors:" in spec else (spec, "", "")
    path = Path(path_text)
    if not path.is_file():
        raise CodecError(f"{path}: no such file; give an existing FILE.safetensors[:NAME] or "
                         f"FILE.npy")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise CodecError(f"{path}: cannot read as .npy ({exc})") from None
        return [(path.stem, as_torch(arr))]
    if path.suffix != ".safetensors":
        raise CodecError(f"{path}: unknown file type {path.suffix!r}; use .safetensors or .npy")
    from safetensors import safe_open

    out = []
    try:
        fh = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise CodecError(f"{path}: cannot read as .safetensors ({str(exc).splitlines()[0]}); "
                         f"the file is truncated or not a safetensors file") from None
    with fh:
        keys = list(fh.keys())
        if name:
            if name not in keys:
                shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                raise CodecError(f"{path}: no tensor named {name!r}; tensors in the file: {shown}")
            return [(name, as_torch(fh.get_tensor(name)))]
        for key in keys:
            t = fh.get_tensor(key)
            if t.dtype in DTYPES.values() and t.numel() > 0:
                out.append((key, t))
    if not out:
        raise CodecError(f"{path}: holds no tensor of a supported dtype ({', '.join(DTYPES)})")
    return out
