"""Packed checkpoints: a model's routed experts stored compressed as a `Policy` says, to serve.

A packed checkpoint is a directory:

    manifest.json              kind "packed_checkpoint", schema_version 1 (see below)
    config.json                the transformers config
    tokenizer.json | ...       the tokenizer, when the model has one
    non_expert.safetensors     every weight that is not a routed expert (attention, norms,
                               embeddings, routers, shared experts, dense MLPs)
    experts/layer_NNN.bin      the routed experts of MoE layer NNN, expert after expert

Each routed-expert tensor is one blob in the codec layer's own format (`Blob.to_bytes()`: header,
payload, CRC32). The blobs of one expert follow each other in its layer file; each blob is placed
so that its payload starts on a 16-byte boundary (padding bytes in between are zero), so a device
decoder can read a payload in place once the expert's bytes have been copied over. One expert's
bytes (`offset`, `size` in the manifest) are what the runtime keeps in host memory and copies to
the GPU on a miss.

The manifest records the model fingerprint, the policy, the geometry, and for every expert and
every blob its file, offset, size, CRC32 and SHA-256, and for every other file its size and
SHA-256. `load_packed` verifies all of them before it trusts a byte; a corrupt or truncated file is
refused with a one-line error naming it. The host memory a packed model occupies is the sum of its
files (`PackedCheckpoint.host_bytes`), and that is what is reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from profiles.errors import MoeszError, PolicyError, ProfileError
from profiles.fileio import (atomic_write_json, atomic_write_text, atomic_write_with,
                             read_versioned_json)

KIND = "packed_checkpoint"
SCHEMA_VERSION = 1
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


def encode_expert(tensors: dict[str, torch.Tensor], spec, digests: bool = True) -> EncodedExpert:
    """Encode one expert's tensors as `spec` says into one aligned record.

    Args:
        tensors: name -> tensor (the expert's views; original dtype; any device).
        spec: a `profiles.policy.StorageSpec`.
        digests: compute each blob's SHA-256 (packed files need it; in-memory stores do not).
    """
    from profiles.codecs import encode

    parts, entries, blobs = [], [], []
    pos = original = 0
    for name, t in tensors.items():
        blob = encode(t.detach(), codec=spec.codec, mode=spec.mode, level=spec.level,
                      **dict(spec.codec_options))
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


# --- writing -----------------------------------------------------------------------------------

def pack(loaded, policy, out_dir: str | os.PathLike, progress: Progress | None = None
         ) -> "PackedCheckpoint":
    """Write `loaded`'s routed experts compressed under `policy`, and the rest, to `out_dir`.

    Args:
        loaded: a `profiles.models.LoadedModel`.
        policy: a `profiles.policy.Policy`; it must fit the model (fingerprint, layers, experts).
        out_dir: an empty or new directory, or an earlier packed checkpoint to overwrite.
        progress: `progress(done, total, label)` once per expert.

    Returns:
        The written checkpoint, read back (`PackedCheckpoint`).

    Raises:
        PolicyError: the policy was made for another model or names layers it lacks.
        PackedError: `out_dir` is a non-empty directory that is not a packed checkpoint.
    """
    from profiles.codecs import get_codec

    emap = loaded.expert_map
    policy.check(emap.moe_layers, emap.experts_per_layer, loaded.fingerprint)
    if loaded.geometry.dtype == "mxfp4":
        raise PolicyError(f"{loaded.spec}: MXFP4 experts cannot be packed by any moesz codec")
    for spec in {policy.default, *policy.layers.values(), *policy.experts.values()}:
        ok, why = get_codec(spec.codec).availability()
        if not ok:
            raise PolicyError(f"policy codec {spec.codec!r} cannot encode here: {why}")
    out = Path(out_dir)
    _check_out_dir(out)
    (out / "experts").mkdir(parents=True, exist_ok=True)
    experts: list[dict] = []
    total, done = len(emap.experts), 0
    for layer in emap.moe_layers:
        rel = f"experts/layer_{layer:03d}.bin"
        records: list[bytes] = []
        pos = 0
        for ref in emap.layer_experts(layer):
            spec = policy.spec_for(layer, ref.expert)
            enc = encode_expert(ref.tensors, spec)
            record = enc.to_bytes()
            pad = (-pos) % ALIGN
            if pad:
                records.append(b"\0" * pad)
                pos += pad
            experts.append(_entry_dict(ExpertEntry(layer, ref.expert, spec.describe(), rel, pos,
                                                   len(record), enc.original_nbytes, enc.entries)))
            records.append(record)
            pos += len(record)
            done += 1
            if progress is not None:
                progress(done, total, f"layer {layer} expert {ref.expert}")
        atomic_write_with(out / rel, lambda p, rs=records: _write_parts(p, rs))
    _write_non_expert(loaded, out)
    atomic_write_text(out / "config.json", loaded.model.config.to_json_string())
    _save_tokenizer(loaded.tokenizer, out)
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST
                       and not p.name.startswith(".")):
        rel = path.relative_to(out).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
    stored = sum(e["size"] for e in experts)
    original = sum(e["original_bytes"] for e in experts)
    manifest = {
        "kind": KIND, "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"spec": loaded.spec, "architecture": loaded.geometry.architecture,
                  "dtype": str(loaded.model.dtype).replace("torch.", "")},
        "fingerprint": loaded.fingerprint,
        "geometry": loaded.geometry.to_dict(),
        "policy": policy.with_fingerprint(policy.fingerprint or loaded.fingerprint).to_dict(),
        "align_bytes": ALIGN,
        "totals": {"experts": len(experts), "stored_expert_bytes": stored,
                   "original_expert_bytes": original,
                   "ratio": original / stored if stored else None},
        "files": files,
        "experts": experts,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return read_packed(out, verify=False)


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PackedError(f"--out {out}: is a file; give a directory for the packed checkpoint")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise PackedError(f"--out {out}: directory is not empty and holds no packed checkpoint; "
                          f"choose a new or empty directory")


def _write_parts(path: Path, parts: list[bytes]) -> None:
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)


def _entry_dict(e: ExpertEntry) -> dict:
    return {"layer": e.layer, "expert": e.expert, "spec": e.spec, "file": e.file,
            "offset": e.offset, "size": e.size, "original_bytes": e.original_bytes,
            "blobs": [{"name": b.name, "offset": b.offset, "size": b.size,
                       "payload_offset": b.payload_offset, "crc32": b.crc32, "sha256": b.sha256}
                      for b in e.blobs]}


def routed_parameter_names(model, expert_map) -> set[str]:
    """Qualified names of the parameters that hold routed experts (fused or per-expert modules)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = set()
    for mod in expert_map.expert_modules.values():
        prefix = names[id(mod)]
        out.update(f"{prefix}.{n}" if prefix else n for n, _ in mod.named_parameters())
    return out


def _write_non_expert(loaded, out: Path) -> None:
    from safetensors.torch import save_file

    skip = routed_parameter_names(loaded.model, loaded.expert_map)
    state, seen = {}, set()
    for name, t in loaded.model.state_dict().items():
        if name in skip:
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:  # a tied weight (lm_head = embed_tokens): the config re-ties it on load
            continue
        seen.add(ptr)
        state[name] = t.detach().contiguous().cpu()
    atomic_write_with(out / NON_EXPERT, lambda p: save_file(state, str(p),
                                                            metadata={"format": "pt"}))


def _save_tokenizer(tokenizer, out: Path) -> None:
    if tokenizer is None:
        return
    from profiles.tasks import CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        tokenizer.save(out / "tokenizer.json")
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


# --- reading -----------------------------------------------------------------------------------

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


def read_packed(path: str | os.PathLike, verify: bool = True) -> PackedCheckpoint:
    """Read a packed checkpoint's manifest; with `verify`, check every file's size and SHA-256.

    Raises:
        PackedError: no manifest, a manifest of another kind or version, a missing file, a file
            whose size or SHA-256 differs from the manifest (corrupt or truncated).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise PackedError(f"{path}: no {MANIFEST}; not a packed checkpoint (make one with "
                          f"`moesz pack MODEL --policy plan.json --out DIR`)")
    try:
        manifest = read_versioned_json(path / MANIFEST, KIND, SCHEMA_VERSION)
        experts = tuple(
            ExpertEntry(int(e["layer"]), int(e["expert"]), str(e["spec"]), str(e["file"]),
                        int(e["offset"]), int(e["size"]), int(e["original_bytes"]),
                        tuple(BlobEntry(str(b["name"]), int(b["offset"]), int(b["size"]),
                                        int(b["payload_offset"]), str(b["crc32"]), str(b["sha256"]))
                              for b in e["blobs"]))
            for e in manifest["experts"])
        files = dict(manifest["files"])
    except ProfileError as exc:
        raise PackedError(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise PackedError(f"{path / MANIFEST}: malformed manifest ({type(exc).__name__}: {exc}); "
                          f"repack the model") from None
    if verify:
        for rel, info in files.items():
            f = path / rel
            if not f.is_file():
                raise PackedError(f"{f}: listed in the manifest but missing; repack the model")
            if f.stat().st_size != int(info["size"]):
                raise PackedError(f"{f}: {f.stat().st_size} bytes, the manifest says "
                                  f"{info['size']}; "
                                  f"the file is truncated or corrupt — repack the model")
            if _sha256_file(f) != info["sha256"]:
                raise PackedError(f"{f}: SHA-256 differs from the manifest; the file is "
                                  f"corrupt — "
                                  f"repack the model")
    return PackedCheckpoint(path, manifest, experts)


def read_expert_files(ckpt: PackedCheckpoint, pin: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Each expert file's bytes as one uint8 tensor (page-locked when `pin` and CUDA is present)."""
    out = {}
    for rel in sorted({e.file for e in ckpt.experts}):
        f = ckpt.path / rel
        size = f.stat().st_size
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin and torch.cuda.is_available())
        with open(f, "rb") as fh:
            n = fh.readinto(memoryview(buf.numpy()))
        if n != size:
            raise PackedError(f"{f}: read {n} of {size} bytes; the file is truncated")
        out[rel] = buf
    return out


def parse_blob(record: torch.Tensor, entry: BlobEntry, where: str):
    """Parse (and CRC-check) one blob inside an expert record; the payload views the record."""
    from profiles.codecs import Blob

    raw = record[entry.offset: entry.offset + entry.size].numpy()
    try:
        blob = Blob.from_bytes(raw, source=where)
    except MoeszError as exc:
        raise PackedError(str(exc)) from None
    stored = int.from_bytes(raw[-4:].tobytes(), "little")
    if entry.crc32 and f"{stored:08x}" != entry.crc32:
        raise PackedError(f"{where}: CRC32 {stored:08x} differs from the manifest's "
                          f"{entry.crc32}; the checkpoint is inconsistent — repack the model")
    return blob


def build_model(ckpt: PackedCheckpoint, trust_remote_code: bool = False):
    """The transformers model of a packed checkpoint with its non-expert weights loaded.

    Routed-expert parameters are allocated but not initialised (their pages stay untouched until
    written); the caller fills them (`load_packed`) or replaces their modules (the runtime).

    Returns:
        (model in eval mode, its expert map).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5.20 kept it in modeling_utils
        from transformers.modeling_utils import no_init_weights

    from profiles.models import build_expert_map

    dtype = getattr(torch, ckpt.manifest["model"].get("dtype", "bfloat16"))
    try:
        config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust_remote_code)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PackedError(f"{ckpt.path}/config.json: cannot build the model "
                          f"({str(exc).splitlines()[0]})") from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # no_init_weights skips the tying that from_config would do
    emap = build_expert_map(model, str(ckpt.path))
    state = load_file(str(ckpt.path / NON_EXPERT))
    result = model.load_state_dict(state, strict=False)
    routed = routed_parameter_names(model, emap)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[n].data_ptr() for n in state if n in params}
    tied = {n for n in result.missing_keys if n in params and params[n].data_ptr() in loaded_ptrs}
    missing = sorted(set(result.missing_keys) - routed - tied)
    if missing or result.unexpected_keys:
        what = missing[0] if missing else result.unexpected_keys[0]
        raise PackedError(f"{ckpt.path / NON_EXPERT}: weights do not match config.json "
                          f"({'missing' if missing else 'unexpected'} {what}); repack the model")
    model.eval()
    return model, emap


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer saved with a packed checkpoint, or None."""
    f = path / "tokenizer.json"
    if f.is_file():
        try:
            if json.loads(f.read_text()).get("kind") == "char_tokenizer":
                from profiles.tasks import CharTokenizer

                return CharTokenizer.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    if any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json",
                                         "tokenizer.model")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return None


def load_packed(path: str | os.PathLike, device: str | torch.device | None = None,
                trust_remote_code: bool = False, progress: Progress | None = None):
    """Read a packed checkpoint back into a working transformers model (experts decoded).

    Every file's SHA-256 and every blob's CRC32 are checked first. The experts hold the decoded
    weights, i.e. exactly what the runtime computes with; the fingerprint is the ORIGINAL model's
    (from the manifest), so plans made for that model still apply.

    Returns:
        A `profiles.models.LoadedModel` (`spec` is the directory).

    Raises:
        PackedError: the checkpoint is missing, corrupt or inconsistent with its config.
    """
    from profiles.codecs import decode
    from profiles.models import LoadedModel

    ckpt = read_packed(path, verify=True)
    model, emap = build_model(ckpt, trust_remote_code)
    files = read_expert_files(ckpt)
    with torch.no_grad():
        for i, entry in enumerate(ckpt.experts):
            record = files[entry.file][entry.offset: entry.offset + entry.size]
            ref = emap.get(entry.layer, entry.expert)
            for b in entry.blobs:
                where = (f"{ckpt.path / entry.file} layer {entry.layer} expert {entry.expert} "
                         f"{b.name}")
                blob = parse_blob(record, b, where)
                if b.name not in ref.tensors:
                    raise PackedError(f"{where}: the model has no expert tensor {b.name!r}; repack")
                ref.tensors[b.name].copy_(decode(blob).reshape(ref.tensors[b.name].shape))
            if progress is not None:
                progress(i + 1, len(ckpt.experts), f"layer {entry.layer} expert {entry.expert}")
    if len(ckpt.experts) != len(emap.experts):
        raise PackedError(f"{ckpt.path}: manifest lists {len(ckpt.experts)} experts, the model has "
                          f"{len(emap.experts)}; repack the model")
    if device is not None:
        model = model.to(device)
    return LoadedModel(model=model, tokenizer=load_tokenizer(ckpt.path, trust_remote_code),
                       geometry=ckpt.geometry, expert_map=emap, fingerprint=ckpt.fingerprint,
                       spec=str(ckpt.path))


def check_policy_matches(ckpt: PackedCheckpoint, policy, where: str = "--policy") -> None:
    """Refuse a policy that differs from the one the checkpoint was packed with.

    Raises:
        PolicyError: another model's fingerprint, or other storage specs than those packed.
    """
    packed = ckpt.policy
    if policy.fingerprint is not None and policy.fingerprint != ckpt.fingerprint:
        raise PolicyError(f"{where} was made for model fingerprint {policy.fingerprint}; the "
                          f"packed "
                          f"checkpoint {ckpt.path} holds model {ckpt.fingerprint}")
    g = ckpt.geometry
    for layer in g.moe_layers:
        for e in range(g.experts_per_layer):
            a, b = policy.spec_for(layer, e), packed.spec_for(layer, e)
            if a != b:
                raise PolicyError(f"{where} stores layer {layer} expert {e} as {a.describe()}, but "
                                  f"{ckpt.path} was packed with {b.describe()}; repack with "
                                  f"`moesz pack` or drop --policy")


__all__ = ["KIND", "SCHEMA_VERSION", "ALIGN", "BlobEntry", "EncodedExpert", "ExpertEntry",
           "PackedCheckpoint", "PackedError", "build_model", "check_policy_matches",
           "encode_expert", "is_packed", "load_packed", "load_tokenizer", "pack", "parse_blob",
           "read_expert_files", "read_packed", "routed_parameter_names"]
