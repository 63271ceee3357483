"""`lossless`: byte planes + zstd, the ZipNN idea (Hershcovitch et al., "ZipNN: Lossless
Compression for AI Models", 2024).

The bytes of each value are split into planes (for bf16: the high byte, holding the sign and most
of the exponent, and the low byte, holding the mantissa); each plane is zstd-compressed on its own.
The exponent plane of trained weights is highly skewed and compresses well, the mantissa plane
hardly at all, which gives about 1.5x on bf16: the ceiling any lossy setting has to beat. It is also
the storage used when a requested error bound cannot be applied (lossless fallback).
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.codecs.registry import Codec, Encoded, payload_tensor
from profiles.errors import CodecError


class LosslessCodec(Codec):
    """Byte-plane split + zstd, bit-exact; CPU only."""

    name = "lossless"
    error_bounded = False
    gpu_decodable = False
    cpu_only = True
    description = "byte planes + zstd (ZipNN idea), bit-exact"
    option_spec = {"zstd_level": (3, None)}

    def encode_payload(self, x, abs_bound, options):
        size = x.element_size()
        raw = x.reshape(-1).view(torch.uint8).cpu().numpy().reshape(-1, size)
        import zstandard

        comp = zstandard.ZstdCompressor(level=int(options.get("zstd_level", 3)))
        planes = [comp.compress(np.ascontiguousarray(raw[:, k]).tobytes()) for k in range(size)]
        payload = np.frombuffer(b"".join(planes), dtype=np.uint8)
        return Encoded(payload=payload, meta={"plane_nbytes": [len(p) for p in planes]})

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        size = torch.empty((), dtype=dtype).element_size()
        n = int(np.prod(shape, dtype=np.int64))
        lengths = [int(v) for v in meta.get("plane_nbytes", [])]
        if len(lengths) != size or sum(lengths) != payload.size:
            raise CodecError(f"lossless blob: plane sizes {lengths} do not match a {payload.size}-byte "
                             f"payload of {size}-byte values; the blob is corrupt")
        out = np.empty((n, size), dtype=np.uint8)
        import zstandard

        dec = zstandard.ZstdDecompressor()
        pos = 0
        for k, length in enumerate(lengths):
            plane = dec.decompress(payload[pos:pos + length].tobytes(), max_output_size=n)
            if len(plane) != n:
                raise CodecError(f"lossless blob: plane {k} holds {len(plane)} bytes, expected {n}")
            out[:, k] = np.frombuffer(plane, dtype=np.uint8)
            pos += length
        t = payload_tensor(out.reshape(-1))
        return t.view(dtype).to(device) if n else torch.empty(0, dtype=dtype, device=device)
