"""`rtn8` / `rtn4`: round-to-nearest integer quantization per output row with absmax scales.

The usual baseline users would pick instead of an error-bounded codec (as in mixtral-offloading's
HQQ experts or LLM.int8's absmax quantization). Rows are the first dimension (the output features of
a `[out, in]` linear weight); each row stores one fp32 scale = max |w| / qmax, values are
round(w / scale) clipped to [-qmax, qmax] (qmax = 127 for 8 bits, 7 for 4 bits, two 4-bit codes per
byte, low nibble first). There is no guaranteed bound: the blob's `abs_bound` is the MEASURED max
error of this tensor after rounding back to its dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs.dtypes import cast_back, dtype_name
from profiles.codecs.registry import Codec, Encoded, payload_tensor
from profiles.errors import CodecError


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return 1, int(np.prod(shape, dtype=np.int64))
    return int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))


class RtnCodec(Codec):
    """Per-row absmax round-to-nearest, 8 or 4 bits; not error-bounded."""

    error_bounded = False
    gpu_decodable = True
    cpu_only = False

    def __init__(self, bits: int):
        if bits not in (8, 4):
            raise ValueError("rtn supports 8 or 4 bits")
        self.bits = bits
        self.name = f"rtn{bits}"
        self.qmax = 127 if bits == 8 else 7
        self.description = (f"per-row absmax: {bits}-bit round-to-nearest, one fp32 scale per row "
                            f"(not error-bounded)")

    def _quantize(self, x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x32.abs().amax(dim=1) / self.qmax                        # [rows] fp32
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x32 / safe[:, None]).clamp_(-self.qmax, self.qmax).to(torch.int8)
        return q, scale

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return q.to(torch.float32) * scale[:, None]

    def encode_payload(self, x, abs_bound, options):
        rows, cols = _rows_cols(tuple(x.shape))
        meta = {"rows": rows, "cols": cols}
        if rows * cols == 0:
            return Encoded(payload=np.zeros(0, np.uint8), meta=meta, abs_bound=0.0)
        x32 = x.reshape(rows, cols).to(torch.float32)
        q, scale = self._quantize(x32)
        back = cast_back(self._dequantize(q, scale), dtype_name(x.dtype)).to(torch.float32)
        measured = float((back - x32).abs().max())
        codes = q.reshape(-1)
        if self.bits == 4:
            u = (codes.to(torch.int16) + 8).to(torch.uint8)
            if u.numel() % 2:
                u = torch.cat([u, u.new_zeros(1)])
            codes = u[0::2] | (u[1::2] << 4)
        payload = np.concatenate([scale.cpu().numpy().view(np.uint8),
                                  codes.contiguous().view(torch.uint8).cpu().numpy()])
        return Encoded(payload=payload, meta=meta, abs_bound=measured)

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        rows, cols = int(meta["rows"]), int(meta["cols"])
        n = rows * cols
        if n == 0:
            return torch.empty(0, dtype=dtype, device=device)
        ncode = n if self.bits == 8 else (n + 1) // 2
        # the offloaded runtime passes a payload already copied to the device (a uint8 tensor)
        size = payload.numel() if isinstance(payload, torch.Tensor) else payload.size
        if size != 4 * rows + ncode:
            raise CodecError(f"{self.name} blob: payload of {size} bytes, expected "
                             f"{4 * rows + ncode}; the blob is corrupt")
        t = (payload if isinstance(payload, torch.Tensor) else payload_tensor(payload)).to(device)
        scale = t[: 4 * rows].clone().view(torch.float32)
        codes = t[4 * rows:]
        if self.bits == 8:
            q = codes.view(torch.int8)
        else:
            lo = (codes & 0x0F).to(torch.int16) - 8
            hi = (codes >> 4).to(torch.int16) - 8
            q = torch.stack([lo, hi], dim=1).reshape(-1)[:n].to(torch.int8)
        x32 = self._dequantize(q.reshape(rows, cols), scale)
        return cast_back(x32.reshape(-1), dtype_name(dtype))
