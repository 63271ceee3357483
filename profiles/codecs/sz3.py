"""`sz3`: SZ3 through pysz on the CPU (Liang et al., "SZ3: A Modular Framework for Composing
Prediction-Based Error-Bounded Lossy Compressors", IEEE TBD 2022).

SZ3 compresses fp32 (bf16/fp16/fp8 are upcast exactly) under an absolute bound. The default
predictor for weights is `nopred`: neighbouring weights are uncorrelated, so prediction only adds
work (compare the predictors with `moesz codecs bench --codecs sz3 ...`, or see docs/codecs.md).

Strict bound (the default; `strict=0` for the relaxed one): the encoder decompresses its own output,
rounds it to the original dtype as decoding does, and appends the values that miss the bound as
patches (`profiles.codecs.patches`), applied after SZ3's decompression with one scatter. Payload
format 2: the SZ3 bytes, then the patch section (format 1, SZ3 bytes only, still decodes).
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs import patches
from profiles.codecs.dtypes import cast_back, dtype_name
from profiles.codecs.registry import Codec, Encoded, payload_tensor
from profiles.errors import CodecError

PREDICTORS = ("nopred", "lorenzo", "interp", "interp-lorenzo")


def _algorithm(predictor: str) -> int:
    from pysz import szAlgorithm

    return {"nopred": szAlgorithm.NOPRED, "lorenzo": szAlgorithm.LORENZO_REG,
            "interp": szAlgorithm.INTERP, "interp-lorenzo": szAlgorithm.INTERP_LORENZO}[predictor]


def sz_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dimensions handed to SZ3: size-1 dims dropped, at most 4 (leading dims merged)."""
    dims = [d for d in shape if d != 1] or [1]
    while len(dims) > 4:
        dims = [dims[0] * dims[1]] + dims[2:]
    return tuple(dims)


class Sz3Codec(Codec):
    """SZ3 (pysz), absolute error bound, CPU."""

    name = "sz3"
    error_bounded = True
    gpu_decodable = False
    cpu_only = True
    description = "SZ3 via pysz; predictor nopred|lorenzo|interp|interp-lorenzo, strict 1|0"
    format_version = 2
    older_versions = (1,)
    option_spec = {"predictor": ("nopred", PREDICTORS), **patches.STRICT_OPTION}
    implicit_options = frozenset({"strict"})

    def availability(self):
        try:
            import pysz  # noqa: F401
        except ImportError:
            return False, "pysz is not installed (pip install pysz)"
        return True, ""

    def encode_payload(self, x, abs_bound, options):
        from pysz import sz, szConfig, szErrorBoundMode

        if x.numel() == 0:
            return Encoded(payload=np.zeros(0, np.uint8), meta={"sz_shape": [0]})
        dims = sz_shape(tuple(x.shape))
        arr = x.detach().to(device="cpu", dtype=torch.float32).reshape(dims).numpy()
        conf = szConfig()
        conf.errorBoundMode = szErrorBoundMode.ABS
        conf.absErrorBound = float(abs_bound)
        conf.cmprAlgo = _algorithm(options["predictor"])
        cmp = np.array(sz.compress(arr, conf)[0], dtype=np.uint8)
        meta = {"sz_shape": list(dims), "sz3_nbytes": int(cmp.size), "patches": 0}
        idx = torch.zeros(0, dtype=torch.int64)
        if patches.is_strict(options):
            xc = x.detach().to("cpu").reshape(-1)
            back = _decompress(cmp, dims, dtype_name(x.dtype))
            idx = patches.violators(xc, lambda lo, piece: back[lo:lo + piece.numel()], abs_bound)
            meta["patches"] = int(idx.numel())
        return Encoded(payload=np.concatenate([cmp, patches.pack(idx, x.detach().to("cpu"))]),
                       meta=meta)

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        dims = tuple(int(d) for d in meta["sz_shape"])
        if dims == (0,):
            return torch.empty(0, dtype=dtype, device=device)
        arr = payload.cpu().numpy() if isinstance(payload, torch.Tensor) else payload
        size = int(meta.get("sz3_nbytes", arr.size))
        count = int(meta.get("patches", 0))
        expect = size + patches.section_nbytes(count, torch.empty((), dtype=dtype).element_size())
        if arr.size != expect:
            raise CodecError(f"sz3 blob: payload of {arr.size} bytes, expected {expect}; the blob "
                             f"is corrupt")
        out = _decompress(arr[:size], dims, dtype_name(dtype))
        idx, vals = patches.unpack(payload_tensor(arr[size:]), count, dtype, out.numel())
        return patches.apply(out, idx, vals).to(device)


def _decompress(cmp: np.ndarray, dims: tuple[int, ...], name: str) -> torch.Tensor:
    """SZ3's decompression rounded back to the original dtype, flat, on the CPU."""
    from pysz import sz

    try:
        arr, _ = sz.decompress(np.ascontiguousarray(cmp, dtype=np.uint8), np.float32, dims)
    except (ValueError, RuntimeError) as exc:
        raise CodecError(f"sz3 blob could not be decompressed ({exc}); the blob is corrupt") from None
    return cast_back(torch.from_numpy(arr.reshape(-1)), name)
