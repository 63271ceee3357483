"""Reading checkpoint directories without loading them: formats, sizes, and FP8 dequantization.

Only safetensors files are read (their JSON headers give every tensor's dtype, shape and byte range
without touching the data); pickle checkpoints are refused because unpickling can run code. FP8
(e4m3) checkpoints in DeepSeek-V3's layout (per-block `weight_scale_inv`) are dequantized here
rather than by transformers, so that it works on a CPU without `accelerate` and is exact: every e4m3
value is representable in fp32, and value x scale is computed once in fp32 (the arithmetic of
DeepSeek's reference `weight_dequant` kernel).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from profiles.errors import ModelError
from profiles.models.geometry import TORCH_DTYPE_NAMES

_ST_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8_e4m3"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def checkpoint_format(config, path: Path) -> tuple[str, tuple[int, int] | None]:
    """(storage dtype of the experts, FP8 scale block) from the config and safetensors headers."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        method = str(qc.get("quant_method", "")).lower()
        if method == "mxfp4":
            return "mxfp4", None
        if method == "fp8":
            fmt = str(qc.get("fmt", "e4m3")).lower()
            if fmt != "e4m3":
                raise ModelError(f"{path}: FP8 format {fmt!r} is not supported; moesz reads e4m3")
            block = qc.get("weight_block_size")
            return "fp8_e4m3", tuple(block) if block else None
        raise ModelError(f"{path}: quantization {method!r} is not supported; moesz reads bf16, "
                         f"fp16, fp32, fp8 (e4m3) and, for geometry only, mxfp4 checkpoints")
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if name is not None:
        name = TORCH_DTYPE_NAMES.get(str(name).replace("torch.", ""))
    if name is None:
        by_dtype: dict[str, int] = {}
        for header in safetensors_headers(path):
            for info in header.values():
                by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + 1
        name = _ST_DTYPES.get(max(by_dtype, key=by_dtype.get), "bf16") if by_dtype else "bf16"
    return name, None



def safetensors_headers(path: Path) -> list[dict]:
    headers = []
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        headers.append(header)
    return headers


def safetensors_total_bytes(path: Path) -> int | None:
    headers = safetensors_headers(path)
    if not headers:
        return None
    return sum(info["data_offsets"][1] - info["data_offsets"][0]
               for header in headers for info in header.values())


def require_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(f"{path}: only pickle checkpoints ({pickled[0]}); moesz loads safetensors "
                         f"only (pickle can run code) — convert with transformers' save_pretrained"
                         f"(..., safe_serialization=True) in a trusted environment")
    raise ModelError(f"{path}: no *.safetensors weights; moesz model info still reports the "
                     f"geometry from config.json")


def dequantized_fp8_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an FP8 checkpoint, e4m3 weights dequantized exactly into fp32."""
    from safetensors import safe_open

    raw: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():
                raw[key] = fh.get_tensor(key)
    out = {}
    for key, t in raw.items():
        if key.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e5m2:
            raise ModelError(f"{path}: tensor {key} is FP8 e5m2; moesz reads e4m3 only")
        if t.dtype == torch.float8_e4m3fn:
            scale = raw.get(key + "_scale_inv")
            t = t.to(torch.float32) if scale is None else _dequant_blocks(t, scale)
        out[key] = t
    return out


def dequantized_mxfp4_state_dict(path: Path, config=None) -> dict[str, torch.Tensor]:
    """All tensors of a gpt-oss MXFP4 checkpoint, each layer's fused experts (`*_blocks`,
    `*_scales`) dequantized exactly into bf16 [E, in, out] as transformers holds them."""
    import re

    from safetensors import safe_open

    from profiles.models.layout import read_expert_tensor
    from profiles.models.loading import open_checkpoint

    files, layout = open_checkpoint(path, config)
    out: dict[str, torch.Tensor] = {}
    for file in files.files:
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():
                if key not in layout.routed or not key.endswith(("_blocks", "_scales")):
                    out[key] = fh.get_tensor(key)
    prefixes = {}
    for key in layout.routed:
        m = re.match(r"^(.*\.layers\.(\d+)\.[A-Za-z_]+\.experts\.)(gate_up_proj|down_proj)_blocks$",
                     key)
        if m:
            prefixes[(int(m[2]), m[3])] = m[1] + m[3]
    for (layer, target), key in prefixes.items():
        out[key] = torch.stack([
            read_expert_tensor(files, next(t for t in layout.experts[(layer, e)]
                                           if t.name == target))
            for e in range(layout.experts_per_layer)])
    files.close()
    return out


def _dequant_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """value x per-block scale in fp32; a block spans ceil(rows / scale rows) x ceil(cols / scale
    cols) values."""
    rows, cols = q.shape[-2:]
    br, bc = -(-rows // scale.shape[-2]), -(-cols // scale.shape[-1])
    s = scale.to(torch.float32).repeat_interleave(br, -2).repeat_interleave(bc, -1)
    return q.to(torch.float32) * s[..., :rows, :cols]
