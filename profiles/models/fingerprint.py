"""Model fingerprints: tell a model from its fine-tune before applying a plan made for one of them.

The fingerprint hashes, for every routed expert in (layer, expert) order and each of its tensors
in name order (moesz's names: `gate_up_proj`, `down_proj`, …), the name, shape and storage dtype
and the bytes of `SAMPLES_PER_TENSOR` elements at evenly spaced flat positions
`k * (n - 1) // (S - 1)` — integer arithmetic, so a tensor of any size is sampled exactly (version
`fp1` computed the positions with float32 `linspace`, which cannot address the last element of a
tensor over 2^24 values). Two checkpoints with the same architecture but different weights differ
in the sampled bytes with overwhelming probability; hashing every byte would cost a full read of
the experts (hundreds of GB for the largest models), the sample costs microseconds per tensor.

The same fingerprint comes from the checkpoint's files (`files_fingerprint`: positioned reads of
the sampled elements, no model built) and from a model in memory (`model_fingerprint`:
the bytes of its tensors), as long as the model holds the stored dtype; `load_model` fingerprints
checkpoints from their files, so a model loaded in another dtype keeps its checkpoint's
fingerprint. gpt-oss's MXFP4 experts are sampled in their stored blocks (the packed bytes), with
the in-memory shape and dtype name `mxfp4`.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch

from profiles.errors import PolicyError
from profiles.models.expert_map import ExpertMap

SAMPLES_PER_TENSOR = 64
FINGERPRINT_VERSION = "fp2"
_TORCH_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.float8_e4m3fn: "fp8_e4m3"}


def sample_positions(numel: int) -> np.ndarray:
    """The flat positions sampled from a tensor of `numel` values (int64, ascending)."""
    if numel <= 0:
        return np.zeros(0, dtype=np.int64)
    s = min(SAMPLES_PER_TENSOR, numel)
    if s == 1:
        return np.zeros(1, dtype=np.int64)
    k = np.arange(s, dtype=np.int64)
    return k * (numel - 1) // (s - 1)


def model_fingerprint(expert_map: ExpertMap) -> str:
    """Fingerprint of a weighted model's routed experts, e.g. ``"fp2:3f2a9c0d1b7e4a55"``.

    Args:
        expert_map: the map of a model whose tensors hold real weights (not on `meta`).

    Returns:
        The version tag and the first 16 hex digits of a SHA-256 over names, shapes, dtypes and
        sampled bytes.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for ref in expert_map.experts:
            for name in sorted(ref.tensors):
                t = ref.tensors[name]
                _update(h, ref.layer, ref.expert, name, tuple(t.shape),
                        _TORCH_NAMES.get(t.dtype, str(t.dtype)), _sample_tensor(t))
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()[:16]}"


def files_fingerprint(files, layout) -> str:
    """The same fingerprint computed from a checkpoint's files (`profiles.models.files`) without
    building or loading the model: each sampled element is read from the shards on its own."""
    from profiles.models.layout import part_start, storage_dtype

    h = hashlib.sha256()
    for (layer, expert), tensors in sorted(layout.experts.items()):
        for t in sorted(tensors, key=lambda t: t.name):
            # an MXFP4 tensor is sampled in its stored blocks (bytes), not its decoded values
            parts = t.parts[:1] if t.format == "mxfp4" else t.parts
            pos = sample_positions(sum(p.numel for p in parts))
            chunks, start = [], 0
            for part in parts:  # the parts' rows stack: flat ranges follow each other
                sel = pos[(pos >= start) & (pos < start + part.numel)] - start
                if len(sel):
                    chunks.append(files.read_at(part.tensor, sel + part_start(files, part)))
                start += part.numel
            _update(h, layer, expert, t.name, t.shape, storage_dtype(t.dtype), b"".join(chunks))
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()[:16]}"


def fingerprint_mismatch(theirs: str | None, ours: str | None, what: str) -> str | None:
    """Why `what` (a plan, policy, profile or packed checkpoint made for model `theirs`) does not
    apply to model `ours`, in one line; None when it applies (or either is unknown). A fingerprint
    of an older version says to redo the file rather than reporting a different model."""
    if theirs is None or ours is None or theirs == ours:
        return None
    version = str(theirs).partition(":")[0]
    if re.fullmatch(r"fp\d+", version) and version != FINGERPRINT_VERSION:
        return (f"{what} carries a {version} model fingerprint ({theirs}) from an older moesz; "
                f"this version fingerprints models as {FINGERPRINT_VERSION} ({ours}) — redo it "
                f"with this version (profile, plan or pack again)")
    return f"{what} was made for model fingerprint {theirs}, this model's is {ours}"


def check_fingerprint(theirs: str | None, ours: str | None, what: str) -> None:
    """Raise PolicyError with `fingerprint_mismatch`'s line unless `what` applies to `ours`."""
    reason = fingerprint_mismatch(theirs, ours, what)
    if reason:
        raise PolicyError(reason)


def _update(h, layer: int, expert: int, name: str, shape, dtype: str, sample: bytes) -> None:
    h.update(f"{layer}.{expert}.{name}|{tuple(int(s) for s in shape)}|{dtype}\n".encode())
    h.update(sample)


def _sample_tensor(t: torch.Tensor) -> bytes:
    n = t.numel()
    if n == 0:
        return b""
    flat = t.reshape(-1)  # a view for the contiguous per-expert slices of fused and Linear weights
    idx = torch.from_numpy(sample_positions(n)).to(flat.device)
    return flat[idx].contiguous().cpu().view(torch.uint8).numpy().tobytes()
