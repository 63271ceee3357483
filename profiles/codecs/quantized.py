"""The codec for the quantized formats users already run: group quantization, NF4, MXFP4, GGUF.

Each format lives in its own module (`gq`, `nf4`, `mxfp4`, `kquants`) with its byte layout and
its CPU reference encode and decode; its Triton dequantization kernel sits beside it
(`gq_triton`, ...). This module turns such a format into a moesz `Codec`: it flattens the tensor
to fp32, stores exactly the bytes the format stores (a partial last block padded or shortened as
the format does), and decodes back to the ORIGINAL dtype.

None of these formats is error-bounded. As `rtn` does, the blob's `abs_bound` is the MEASURED max
error of this tensor after rounding the decode back to its dtype, so every moesz table that prints
a bound prints what these formats actually did.

A format module provides:

    payload_nbytes(n, **options) -> int          bytes the format stores for n values
    encode(x, **options) -> np.ndarray[uint8]    x: flat fp32 numpy array
    decode(payload, n, **options) -> Tensor      payload: flat uint8 tensor (any device); fp32 out

and its `_triton` module `decode(payload, n, out_dtype, **options)` on CUDA (or the CPU
interpreter), bit-identical to `decode`.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import numpy as np
import torch

from profiles.codecs.dtypes import cast_back, dtype_name
from profiles.codecs.registry import Codec, Encoded, payload_tensor
from profiles.errors import CodecError


def triton_ready(device: torch.device) -> bool:
    """Triton kernels for a CUDA device when triton is installed (imported only then)."""
    if device.type != "cuda":
        return False
    from profiles.codecs import triton_util

    return triton_util.available()[0]


class QuantizedCodec(Codec):
    """A block-quantized format as a codec; not error-bounded (the bound is the measured max error).

    Subclasses set `name`, `description`, `option_spec`, `format_module` and `triton_module`;
    `fixed_options` are passed to the format but not stored (a GGUF type per codec name).
    """

    error_bounded = False
    gpu_decodable = True
    cpu_only = False
    format_module: ClassVar[str]
    triton_module: ClassVar[str]
    fixed_options: dict[str, Any] = {}

    def _fmt(self):
        return importlib.import_module(self.format_module)

    def _opts(self, options: dict[str, Any]) -> dict[str, Any]:
        return {**options, **self.fixed_options}

    def encode_payload(self, x, abs_bound, options):
        fmt = self._fmt()
        opts = self._opts(options)
        n = x.numel()
        if n == 0:
            return Encoded(payload=np.zeros(0, np.uint8), meta={}, abs_bound=0.0)
        x32 = x.reshape(-1).to(torch.float32)
        payload = fmt.encode(np.ascontiguousarray(x32.cpu().numpy()), **opts)
        expected = fmt.payload_nbytes(n, **opts)
        if payload.size != expected:  # a format module bug, not bad input
            raise AssertionError(f"{self.name}: encoded {payload.size} bytes, layout says "
                                 f"{expected}")
        back = cast_back(fmt.decode(payload_tensor(payload), n, **opts), dtype_name(x.dtype))
        flat = x.reshape(-1).cpu()
        measured = 0.0                       # exact (float64) max error, in pieces of 2^20 values
        for lo in range(0, n, 1 << 20):
            hi = lo + (1 << 20)
            d = back[lo:hi].to(torch.float64) - flat[lo:hi].to(torch.float64)
            measured = max(measured, float(d.abs().max()))
        return Encoded(payload=payload, meta={}, abs_bound=measured)

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        fmt = self._fmt()
        opts = self._opts(options)
        n = int(np.prod(shape, dtype=np.int64))
        size = payload.numel() if isinstance(payload, torch.Tensor) else payload.size
        expected = fmt.payload_nbytes(n, **opts) if n else 0
        if size != expected:
            raise CodecError(f"{self.name} blob: payload of {size} bytes, expected {expected} for "
                             f"{n} values; the blob is corrupt")
        if n == 0:
            return torch.empty(0, dtype=dtype, device=device)
        # the offloaded runtime may pass a payload already copied to the device (a uint8 tensor)
        t = (payload if isinstance(payload, torch.Tensor) else payload_tensor(payload)).to(device)
        if triton_ready(t.device):
            kernel = importlib.import_module(self.triton_module)
            return kernel.decode(t, n, dtype, **opts)
        return cast_back(fmt.decode(t, n, **opts), dtype_name(dtype))


def view_as(payload: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` values of `dtype` stored at byte `start` of a uint8 tensor (copied if misaligned)."""
    size = torch.empty((), dtype=dtype).element_size()
    piece = payload[start:start + count * size]
    if start % size:
        piece = piece.clone()
    return piece.view(dtype)


class GqCodec(QuantizedCodec):
    """Group-wise asymmetric min-max quantization, fp16 scale and zero (GPTQ/HQQ storage)."""

    name = "gq"
    description = ("group-wise asymmetric min-max, fp16 scale + zero per group (GPTQ/HQQ storage; "
                   "not error-bounded); bits 2|3|4|8, group 32|64|128")
    option_spec = {"bits": (4, (2, 3, 4, 8)), "group": (64, (32, 64, 128))}
    format_module = "profiles.codecs.gq"
    triton_module = "profiles.codecs.gq_triton"


class Mxfp4Codec(QuantizedCodec):
    """OCP MXFP4: 32-value blocks, e8m0 scale, e2m1 values (GGUF block layout).

    `blocks=columns` forms each block from 32 consecutive values down a column of a 2-D tensor
    (the tensor is encoded transposed): gpt-oss stores its experts [in, out] in memory with
    blocks along `in`, so its shipped experts re-encode this way to the same values at the same
    bytes (equal values; a shipped -0.0 decodes as +0.0, as GGUF's decoder gives code 8). The default `rows` blocks the flattened tensor (GGUF, llama.cpp).
    """

    name = "mxfp4"
    description = ("OCP MXFP4: 32 values share an e8m0 scale, e2m1 values (not error-bounded); "
                   "scale ocp|llamacpp|ceil; blocks rows|columns (columns: gpt-oss's layout)")
    option_spec = {"scale": ("ocp", ("ocp", "llamacpp", "ceil")),
                   "blocks": ("rows", ("rows", "columns"))}
    implicit_options = frozenset({"blocks"})
    format_module = "profiles.codecs.mxfp4"
    triton_module = "profiles.codecs.mxfp4_triton"

    def _opts(self, options):
        return {k: v for k, v in options.items() if k != "blocks"}

    @staticmethod
    def _columns(options, ndim: int) -> bool:
        return options.get("blocks", "rows") == "columns" and ndim == 2

    def encode_payload(self, x, abs_bound, options):
        if self._columns(options, x.dim()):
            x = x.t().contiguous()
        return super().encode_payload(x, abs_bound, options)

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        if not self._columns(options, len(shape)):
            return super().decode_payload(payload, meta, dtype, shape, abs_bound, options, device)
        rows, cols = shape
        out = super().decode_payload(payload, meta, dtype, (cols, rows), abs_bound, options,
                                     device)
        return out.reshape(cols, rows).t().contiguous().reshape(-1)


class Nf4Codec(QuantizedCodec):
    """NF4, block 64, absmax double-quantized as bitsandbytes stores it (dq=false: fp32 absmax)."""

    name = "nf4"
    description = ("NF4 block 64, absmax double-quantized as bitsandbytes stores it (not "
                   "error-bounded); dq true|false")
    option_spec = {"dq": (True, (True, False))}
    format_module = "profiles.codecs.nf4"
    triton_module = "profiles.codecs.nf4_triton"

    def check_options(self, options):
        """`dq` accepts true/false as booleans or as the words a spec or the CLI gives."""
        opts = dict(options)
        if isinstance(opts.get("dq"), str) and opts["dq"].lower() in ("true", "false"):
            opts["dq"] = opts["dq"].lower() == "true"
        elif opts.get("dq") in (0, 1) and not isinstance(opts.get("dq"), bool):
            opts["dq"] = bool(opts["dq"])
        return super().check_options(opts)


class KQuantCodec(QuantizedCodec):
    """One GGUF type (q2_k ... q6_k, q8_0) with llama.cpp's block layout and scale search."""

    format_module = "profiles.codecs.kquants"
    triton_module = "profiles.codecs.kquants_triton"
    _BITS = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625,
             "q8_0": 8.5}

    def __init__(self, qtype: str):
        self.name = qtype
        self.fixed_options = {"qtype": qtype}
        how = ("llama.cpp layout, absmax / 127 per 32-value block" if qtype == "q8_0" else
               "llama.cpp layout and reference scale search, 256-value super-blocks")
        self.description = (f"GGUF {qtype.upper()}: {how}, {self._BITS[qtype]:g} bits/weight "
                            f"(not error-bounded)")


__all__ = ["QuantizedCodec", "GqCodec", "Mxfp4Codec", "Nf4Codec", "KQuantCodec", "view_as",
           "triton_ready"]
