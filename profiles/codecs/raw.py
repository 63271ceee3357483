"""`raw`: the original bytes, unchanged — what "no compression" costs, through the same interface."""

from __future__ import annotations

import torch

from profiles.codecs.registry import Codec, Encoded, payload_tensor


class RawCodec(Codec):
    """Stores the tensor's bytes as they are (ratio just below 1 because of the blob header)."""

    name = "raw"
    error_bounded = False
    gpu_decodable = True
    cpu_only = False
    description = "original bytes, no compression"

    def encode_payload(self, x, abs_bound, options):
        return Encoded(payload=x.reshape(-1).view(torch.uint8).cpu().numpy())

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        t = payload_tensor(payload)
        if t.numel() == 0:
            return torch.empty(0, dtype=dtype, device=device)
        return t.to(device).view(dtype)
