"""`sz3`: SZ3 through pysz on the CPU (Liang et al., "SZ3: A Modular Framework for Composing
Prediction-Based Error-Bounded Lossy Compressors", IEEE TBD 2022).

SZ3 compresses fp32 (bf16/fp16/fp8 are upcast exactly) under an absolute bound. The default
predictor for weights is `nopred`: neighbouring weights are uncorrelated, so prediction only adds
work (compare the predictors with `moesz codecs bench --codecs sz3 ...`, or see docs/codecs.md).
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs.dtypes import cast_back, dtype_name
from profiles.codecs.registry import Codec, Encoded
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
    description = "SZ3 via pysz; predictor nopred|lorenzo|interp|interp-lorenzo"
    option_spec = {"predictor": ("nopred", PREDICTORS)}

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
        cmp, _ = sz.compress(arr, conf)
        return Encoded(payload=np.array(cmp, dtype=np.uint8), meta={"sz_shape": list(dims)})

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        from pysz import sz

        dims = tuple(int(d) for d in meta["sz_shape"])
        if dims == (0,):
            return torch.empty(0, dtype=dtype, device=device)
        try:
            arr, _ = sz.decompress(np.ascontiguousarray(payload, dtype=np.uint8), np.float32, dims)
        except (ValueError, RuntimeError) as exc:
            raise CodecError(f"sz3 blob could not be decompressed ({exc}); the blob is corrupt") from None
        x32 = torch.from_numpy(arr.reshape(-1)).to(device)
        return cast_back(x32, dtype_name(dtype))
