"""Writing a packed checkpoint (`moesz pack`): every routed expert encoded as the policy says, in
one file per MoE layer, the other weights as safetensors, and a manifest with every checksum."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from profiles.errors import PolicyError
from profiles.fileio import atomic_write_json, atomic_write_text, atomic_write_with
from profiles.packed.read import read_packed
from profiles.packed.records import (
    ALIGN,
    KIND,
    MANIFEST,
    NON_EXPERT,
    SCHEMA_VERSION,
    ExpertEntry,
    PackedCheckpoint,
    PackedError,
    Progress,
    encode_expert,
    routed_parameter_names,
    sha256_file,
)


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
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
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
