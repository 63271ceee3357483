"""The packed-checkpoint format's records: constants, manifest entries, one expert's aligned
record (`encode_expert`) and the manifest as read (`PackedCheckpoint`). The format itself is
described in `profiles.packed`."""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from profiles.errors import ProfileError
from profiles.policy import PACKED_KIND, PACKED_SCHEMA_VERSION

KIND, SCHEMA_VERSION = PACKED_KIND, PACKED_SCHEMA_VERSION  # profiles.policy reads manifests too
MANIFEST = "manifest.json"
NON_EXPERT = "non_expert.safetensors"
ALIGN = 16  # payload alignment inside an expert record (szp reads payloads as int32 words)
Progress = Callable[[int, int, str], None]


class PackedError(ProfileError):
    """A packed checkpoint is missing, corrupt, or does not fit the model or policy used with it."""


@dataclass(frozen=True)
class BlobEntry:
    """One expert tensor's blob inside an expert record (offsets relative to the record)."""

    name: str
    offset: int            # where the blob's bytes start
    size: int              # Blob.nbytes
    payload_offset: int    # where its payload starts (a multiple of ALIGN)
    crc32: str
    sha256: str


@dataclass(frozen=True)
class ExpertEntry:
    """One routed expert: where its record lives and what it holds."""

    layer: int
    expert: int
    spec: str              # StorageSpec.describe()
    file: str              # relative to the checkpoint directory
    offset: int
    size: int              # record bytes (blobs and alignment padding)
    original_bytes: int    # the expert in its original dtype
    blobs: tuple[BlobEntry, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)


@dataclass(frozen=True)
class EncodedExpert:
    """One expert encoded into an aligned record: `parts` are (offset, blob bytes), `size` the
    record length (padding bytes are zero), `blobs` the `Blob` objects in the same order."""

    parts: tuple[tuple[int, bytes], ...]
    entries: tuple[BlobEntry, ...]
    blobs: tuple
    original_nbytes: int
    size: int

    def to_bytes(self) -> bytes:
        out = bytearray(self.size)
        for off, raw in self.parts:
            out[off: off + len(raw)] = raw
        return bytes(out)


def shipped_spec(dtype: str):
    """How `raw` stores an expert matrix of a checkpoint that ships quantized, or None (raw
    means the original bytes). gpt-oss's MXFP4 experts are kept as shipped: `mxfp4` with blocks
    down the columns of the in-memory [in, out] matrix re-encodes the shipped values exactly (a
    -0.0 comes back +0.0), at the shipped bytes plus the blob header; biases stay raw."""
    from profiles.policy import StorageSpec

    return StorageSpec("mxfp4", codec_options={"blocks": "columns"}) if dtype == "mxfp4" else None


def encode_expert(tensors: dict[str, torch.Tensor], spec, digests: bool = True,
                  raw_as=None, layout=None) -> EncodedExpert:
    """Encode one expert's tensors as `spec` says into one aligned record.

    Args:
        tensors: name -> tensor (the expert's views; original dtype; any device).
        spec: a `profiles.policy.StorageSpec`, or an `ExpertSpecs` giving each matrix its own
            (`Policy.expert_specs`): each tensor is one blob, so each carries its own codec.
            Where it stores `gate` or `up` apart from `gate_up`, a fused `gate_up_proj` (and its
            bias) is stored as two blobs, `gate_proj` and `up_proj` (`profiles.models.gate_up`).
        digests: compute each blob's SHA-256 (packed files need it; in-memory stores do not).
        raw_as: how a `raw` spec stores matrices (`shipped_spec` of the checkpoint's dtype).
        layout: the model's `GateUpLayout` (needed only to split gate and up).

    Raises:
        PolicyError: the specs split gate and up of a fused tensor and no layout is given.
    """
    from profiles.codecs import encode
    from profiles.models.gate_up import PARTS, split_expert
    from profiles.policy import ExpertSpecs, spec_of_tensor

    if isinstance(spec, ExpertSpecs) and spec.splits_gate_up and any(n in PARTS for n in tensors):
        if layout is None:
            from profiles.errors import PolicyError

            raise PolicyError("gate and up are stored apart but the model's gate/up layout is "
                              "unknown; use 'gate_up'")
        tensors = split_expert(tensors, layout)
    parts, entries, blobs = [], [], []
    pos = original = 0
    for name, t in tensors.items():
        s = spec_of_tensor(spec, name)
        s = raw_as if s.codec == "raw" and raw_as is not None and t.dim() == 2 else s
        blob = encode(t.detach(), codec=s.codec, mode=s.mode, level=s.level,
                      **dict(s.codec_options))
        raw = blob.to_bytes()
        head = len(raw) - blob.payload_nbytes - 4       # bytes before the payload
        pos += (-(pos + head)) % ALIGN
        # the blob's own CRC32 (of every byte before it; a CRC over a message that ends in its
        # own CRC is a constant, so the whole blob's would say nothing)
        entries.append(BlobEntry(name, pos, len(raw), pos + head, f"{zlib.crc32(raw[:-4]):08x}",
                                 hashlib.sha256(raw).hexdigest() if digests else ""))
        parts.append((pos, raw))
        blobs.append(blob)
        pos += len(raw)
        original += blob.original_nbytes
    return EncodedExpert(tuple(parts), tuple(entries), tuple(blobs), original, pos)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


@dataclass(frozen=True)
class PackedCheckpoint:
    """A packed checkpoint's manifest, read and (optionally) verified."""

    path: Path
    manifest: dict
    experts: tuple[ExpertEntry, ...]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def policy(self):
        from profiles.policy import Policy

        return Policy.from_dict(self.manifest["policy"], f"{self.path / MANIFEST} policy")

    @property
    def geometry(self):
        from profiles.models import ModelGeometry

        g = dict(self.manifest["geometry"])
        g.pop("routed_expert_bytes", None)
        g["moe_layers"] = tuple(g["moe_layers"])
        g["expert_tensor_shapes"] = tuple((n, tuple(s))
                                          for n, s in g["expert_tensor_shapes"].items())
        return ModelGeometry(**g)

    @property
    def host_bytes(self) -> int:
        """Bytes of every file of the checkpoint (what it occupies on disk and in host memory)."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    @property
    def stored_expert_bytes(self) -> int:
        return sum(e.size for e in self.experts)

    @property
    def original_expert_bytes(self) -> int:
        return sum(e.original_bytes for e in self.experts)


def is_packed(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a packed-checkpoint manifest."""
    return (Path(path) / MANIFEST).is_file()


def routed_parameter_names(model, expert_map) -> set[str]:
    """Qualified names of the parameters that hold routed experts (fused or per-expert modules)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = set()
    for mod in expert_map.expert_modules.values():
        prefix = names[id(mod)]
        out.update(f"{prefix}.{n}" if prefix else n for n, _ in mod.named_parameters())
    return out
