"""Model fingerprints: tell a model from its fine-tune before applying a plan made for one of them.

The fingerprint hashes, for every routed expert tensor in map order, its name, shape and dtype and a
fixed sample of its bytes (`SAMPLES_PER_TENSOR` elements at evenly spaced flat positions). Two
checkpoints with the same architecture but different weights differ in the sampled bytes with
overwhelming probability; hashing every byte would cost a full read of the experts (hundreds of GB
for the largest models), the sample costs microseconds per tensor.

The fingerprint depends on the dtype the model was loaded in (the sampled bytes are those of the
in-memory tensors), so plans and the models they are applied to must be loaded the same way.
"""

from __future__ import annotations

import hashlib

import torch

from profiles.models.expert_map import ExpertMap

SAMPLES_PER_TENSOR = 64
FINGERPRINT_VERSION = "fp1"


def model_fingerprint(expert_map: ExpertMap) -> str:
    """Fingerprint of a weighted model's routed experts, e.g. ``"fp1:3f2a9c0d1b7e4a55"``.

    Args:
        expert_map: the map of a model whose tensors hold real weights (not on `meta`).

    Returns:
        The version tag and the first 16 hex digits of a SHA-256 over names, shapes, dtypes and
        sampled bytes.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for ref in expert_map.experts:
            for name, t in ref.tensors.items():
                h.update(f"{ref.layer}.{ref.expert}.{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
                h.update(_sample_bytes(t))
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()[:16]}"


def _sample_bytes(t: torch.Tensor) -> bytes:
    n = t.numel()
    if n == 0:
        return b""
    flat = t.reshape(-1)  # a view for the contiguous per-expert slices of fused and Linear weights
    idx = torch.linspace(0, n - 1, steps=min(SAMPLES_PER_TENSOR, n)).round().long()
    sample = flat[idx.to(flat.device)].contiguous().cpu()
    return sample.view(torch.uint8).numpy().tobytes()
