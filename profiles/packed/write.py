"""Writing a packed checkpoint (`moesz pack`): every routed expert encoded as the policy says, in
one file per MoE layer, the other weights as safetensors, and a manifest with every checksum.

Packing streams: each expert is read from its source (the checkpoint's files, or a model in
memory), encoded, appended to its layer's file and dropped, so memory holds one expert and the
codec's buffers whatever the checkpoint's size; the non-expert weights are copied tensor by tensor
in pieces. An interrupted pack resumes: each finished layer file is recorded in `.pack-state/`
with its SHA-256 (verified before it is reused), and the manifest, which is what makes a directory
a packed checkpoint, is written last. A directory without it is never taken for a complete one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

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
    encode_expert,
    sha256_file,
    shipped_spec,
)

STATE_DIR = ".pack-state"
# progress(done_bytes, total_bytes, label): bytes of original expert data packed so far
ByteProgress = Callable[[int, int, str], None]


def pack(model, policy, out_dir: str | os.PathLike, progress: ByteProgress | None = None
         ) -> PackedCheckpoint:
    """Write `model`'s routed experts compressed under `policy`, and the rest, to `out_dir`.

    Args:
        model: a spec (`builtin` or a checkpoint directory: streamed from its files), a
            `profiles.models.LoadedModel`, or an expert source (`profiles.models.source`).
        policy: a `profiles.policy.Policy`; it must fit the model (fingerprint, layers, experts).
        out_dir: a new or empty directory, an interrupted pack of the same model and policy (it
            resumes), or an earlier packed checkpoint to overwrite.
        progress: `progress(done_bytes, total_bytes, label)` after each expert; bytes of the
            experts' original dtype.

    Returns:
        The written checkpoint, read back (`PackedCheckpoint`).

    Raises:
        PolicyError: the policy was made for another model or names layers it lacks.
        PackedError: `out_dir` is a non-empty directory that is not a packed checkpoint, or the
            disk filled (finished layer files are kept: rerun to resume).
    """
    from profiles.codecs import get_codec
    from profiles.models.source import expert_source

    src = expert_source(model)
    policy.check(src.moe_layers, src.experts_per_layer, src.fingerprint,
                 tensor_names=[n for n, _ in src.geometry.expert_tensor_shapes],
                 architecture=src.geometry.architecture)
    for spec in policy.all_specs():
        ok, why = get_codec(spec.codec).availability()
        if not ok:
            raise PolicyError(f"policy codec {spec.codec!r} cannot encode here: {why}")
    out = Path(out_dir)
    stamp = {"fingerprint": src.fingerprint, "policy": policy.to_dict(), "align_bytes": ALIGN}
    done_layers = _prepare(out, stamp)
    per_layer = src.experts_per_layer * src.geometry.bytes_per_expert
    total = per_layer * len(src.moe_layers)
    experts: list[dict] = []
    files: dict[str, dict] = {}
    try:
        for i, layer in enumerate(src.moe_layers):
            rel = f"experts/layer_{layer:03d}.bin"
            if layer in done_layers:
                entries, info = done_layers[layer]
            else:
                entries, info = _pack_layer(src, policy, layer, out, rel, i * per_layer, total,
                                            progress)
                atomic_write_json(out / STATE_DIR / f"layer_{layer:03d}.json",
                                  {"file": rel, **info, "experts": entries})
            experts.extend(entries)
            files[rel] = info
            if progress is not None:
                progress((i + 1) * per_layer, total, f"layer {layer} done")
        _write_non_expert(src, out)
        atomic_write_text(out / "config.json", src.config_json())
        src.copy_tokenizer(out)
    except OSError as exc:
        raise _disk_error(exc, out, len(files), len(src.moe_layers)) from None
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST
                       and not any(part.startswith(".") for part in p.relative_to(out).parts)):
        rel = path.relative_to(out).as_posix()
        if rel not in files:
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    stored = sum(e["size"] for e in experts)
    original = sum(e["original_bytes"] for e in experts)
    checkpoint = int(src.geometry.bytes_per_expert) * len(experts)
    manifest = {
        "kind": KIND, "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"spec": src.spec, "architecture": src.geometry.architecture,
                  "dtype": str(src.dtype).replace("torch.", "")},
        "fingerprint": src.fingerprint,
        "geometry": src.geometry.to_dict(),
        "policy": policy.with_fingerprint(policy.fingerprint or src.fingerprint).to_dict(),
        "align_bytes": ALIGN,
        # original: the decoded tensors' bytes (the in-memory dtype); checkpoint: what the
        # checkpoint stores for them (differs when it ships quantized, e.g. gpt-oss MXFP4)
        "totals": {"experts": len(experts), "stored_expert_bytes": stored,
                   "original_expert_bytes": original,
                   "ratio": original / stored if stored else None,
                   "checkpoint_expert_bytes": checkpoint,
                   "checkpoint_dtype": src.geometry.dtype,
                   "ratio_vs_checkpoint": checkpoint / stored if stored else None},
        "files": dict(sorted(files.items())),
        "experts": experts,
    }
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return read_packed(out, verify=False)


def _prepare(out: Path, stamp: dict) -> dict[int, tuple[list[dict], dict]]:
    """Make `out` ready and return the layers an interrupted pack of the same model and policy
    finished (layer -> (expert entries, file info)), each verified by its SHA-256."""
    if out.exists() and not out.is_dir():
        raise PackedError(f"--out {out}: is a file; give a directory for the packed checkpoint")
    state = out / STATE_DIR
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists() \
            and not state.is_dir():
        raise PackedError(f"--out {out}: directory is not empty and holds no packed checkpoint; "
                          f"choose a new or empty directory")
    earlier = _listed_files(out)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the directory is incomplete
    state.mkdir(parents=True, exist_ok=True)
    (out / "experts").mkdir(exist_ok=True)
    stamp_file = state / "pack.json"
    try:
        resumable = json.loads(stamp_file.read_text()) == stamp
    except (OSError, ValueError):
        resumable = False
    done: dict[int, tuple[list[dict], dict]] = {}
    if resumable:
        for f in sorted(state.glob("layer_*.json")):
            try:
                doc = json.loads(f.read_text())
                layer_file = out / doc["file"]
                if layer_file.is_file() and layer_file.stat().st_size == doc["size"] \
                        and sha256_file(layer_file) == doc["sha256"]:
                    done[int(doc["experts"][0]["layer"])] = (
                        doc["experts"], {"size": doc["size"], "sha256": doc["sha256"]})
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                continue  # a damaged record: that layer is packed again
    else:
        for f in state.glob("layer_*.json"):
            f.unlink()
        _remove_earlier_output(out, earlier)
        atomic_write_json(stamp_file, stamp)
    return done


def _listed_files(out: Path) -> set[str]:
    """The files an earlier complete pack in `out` lists in its manifest (none if unreadable)."""
    try:
        return {str(rel) for rel in json.loads((out / MANIFEST).read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _remove_earlier_output(out: Path, listed: set[str]) -> None:
    """Remove what an earlier pack of another model or policy wrote into `out` (its layer files,
    weights, config and tokenizer): the manifest lists every file it finds in `out`, so a stale
    one would pass for part of the new checkpoint (another model's tokenizer, a layer it lacks)."""
    from profiles.models.source import TOKENIZER_FILES

    names = set(listed) | {NON_EXPERT, "config.json", *TOKENIZER_FILES}
    names |= {p.relative_to(out).as_posix() for p in (out / "experts").glob("layer_*.bin")}
    for rel in names:
        target = out / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not target.is_file():
            continue  # only files inside `out`
        target.unlink()


def _pack_layer(src, policy, layer: int, out: Path, rel: str, done0: int, total: int,
                progress) -> tuple[list[dict], dict]:
    """Encode one layer's experts into its file, streaming; (manifest entries, file info)."""
    from profiles.models.gate_up import gate_up_layout

    entries: list[dict] = []
    h = hashlib.sha256()
    box: dict = {}
    nbytes = src.geometry.bytes_per_expert
    raw_as = shipped_spec(src.geometry.dtype)  # raw MXFP4 experts stay as shipped
    layout = gate_up_layout(src.geometry.architecture)

    def write(tmp: Path) -> None:
        pos = 0
        with open(tmp, "wb") as fh:
            for e in range(src.experts_per_layer):
                spec = policy.expert_specs(layer, e)
                enc = encode_expert(src.expert_tensors(layer, e), spec, raw_as=raw_as,
                                    layout=layout)
                pad = (-pos) % ALIGN
                record = b"\0" * pad + enc.to_bytes()
                fh.write(record)
                h.update(record)
                pos += pad
                entries.append(_entry_dict(ExpertEntry(layer, e, spec.describe(), rel, pos,
                                                       enc.size, enc.original_nbytes,
                                                       enc.entries)))
                pos += enc.size
                del enc, record
                if progress is not None:
                    progress(done0 + (e + 1) * nbytes, total, f"layer {layer} expert {e}")
            fh.flush()
            os.fsync(fh.fileno())
        box["size"] = pos

    atomic_write_with(out / rel, write)
    return entries, {"size": box["size"], "sha256": h.hexdigest()}


def _write_non_expert(src, out: Path) -> None:
    from profiles.models.files import write_safetensors

    tensors = [t for _, t in src.non_expert_tensors()]
    atomic_write_with(out / NON_EXPERT, lambda p: write_safetensors(p, tensors,
                                                                    {"format": "pt"}))


def _disk_error(exc: OSError, out: Path, done: int, layers: int) -> PackedError:
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "a file grew past the size this process may write"}.get(
        exc.errno, f"a write failed ({exc.strerror or exc})")
    return PackedError(f"--out {out}: {what} while packing; {done} of {layers} layer files are "
                       f"complete and kept, the directory is marked incomplete (no {MANIFEST}) — "
                       f"free space and rerun the same command to resume")


def _entry_dict(e: ExpertEntry) -> dict:
    return {"layer": e.layer, "expert": e.expert, "spec": e.spec, "file": e.file,
            "offset": e.offset, "size": e.size, "original_bytes": e.original_bytes,
            "blobs": [{"name": b.name, "offset": b.offset, "size": b.size,
                       "payload_offset": b.payload_offset, "crc32": b.crc32, "sha256": b.sha256}
                      for b in e.blobs]}


def pack_rate(original_bytes: int, seconds: float) -> float:
    """MB/s of original expert bytes packed (measured by the caller's clock)."""
    return original_bytes / seconds / 1e6 if seconds > 0 else float("nan")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (measured, `getrusage`)."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024
