"""Reading a packed checkpoint back: the manifest verified file by file, expert records into
(optionally pinned) host memory, blobs parsed in place, and the model rebuilt around them."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import torch

from profiles.errors import MoeszError, PolicyError, ProfileError
from profiles.fileio import read_versioned_json
from profiles.packed.records import (
    KIND,
    MANIFEST,
    NON_EXPERT,
    SCHEMA_VERSION,
    BlobEntry,
    ExpertEntry,
    PackedCheckpoint,
    PackedError,
    Progress,
    sha256_file,
)


def read_packed(path: str | os.PathLike, verify: bool = True) -> PackedCheckpoint:
    """Read a packed checkpoint's manifest; with `verify`, check every file's size and SHA-256.

    Raises:
        PackedError: no manifest, a manifest of another kind or version, a missing file, a file
            whose size or SHA-256 differs from the manifest (corrupt or truncated).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() and (path / ".pack-state").is_dir():
        raise PackedError(f"{path}: an incomplete packed checkpoint (the pack was interrupted or "
                          f"failed; no {MANIFEST}); rerun the same `moesz pack` command to "
                          f"resume it")
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
            if sha256_file(f) != info["sha256"]:
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


_PAGE = 4096
# what a filesystem answers when it refuses O_DIRECT reads (alignment, no support); any other
# error of a read is the drive's, and is reported
_DIRECT_REFUSED = (errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL),
                   getattr(errno, "ENOTSUP", errno.EINVAL))
READ_METHODS = ("direct", "fadvise", "cached")


def _fallback() -> str:
    """What `direct` falls back to: `fadvise`, or `cached` where there is no posix_fadvise."""
    return "fadvise" if hasattr(os, "posix_fadvise") else "cached"


class RecordFiles:
    """Positioned reads of single expert records from a packed checkpoint's layer files, one open
    descriptor per file (closed by `close()` or when dropped): what the disk tier and evaluation
    with experts on disk read on each miss. Safe to call from several threads at once.

    `method` says how the page cache is treated, so that what a disk-tier run measures is the
    disk and not RAM: `direct` (O_DIRECT: the page-aligned span around the record is read into a
    page-aligned buffer; falls back to `fadvise` where the filesystem refuses O_DIRECT),
    `fadvise` (a normal read, then `posix_fadvise(DONTNEED)` drops the record's pages), or
    `cached` (normal reads through the page cache, the default for evaluation).
    """

    def __init__(self, ckpt: PackedCheckpoint, method: str = "cached") -> None:
        if method not in READ_METHODS:
            raise ValueError(f"read method {method!r}; expected one of {', '.join(READ_METHODS)}")
        self.ckpt = ckpt
        self.method = method
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int] = {}
        self._lock = threading.Lock()        # descriptors are opened once, by one thread

    def read(self, entry: ExpertEntry, pin: bool = False) -> torch.Tensor:
        """Expert `entry`'s record bytes as a uint8 tensor (page-locked when `pin`).

        Raises:
            PackedError: the layer file ends inside the record, or the drive failed the read.
        """
        if self.method == "direct":
            fd = self._direct_fd(entry.file)
            if fd is not None:
                try:
                    return self._read_direct(fd, entry, pin)
                except OSError as exc:
                    if exc.errno not in _DIRECT_REFUSED:
                        raise self._read_error(entry, exc) from None
                    self.method = _fallback()   # O_DIRECT refused at read time (alignment)
        host = torch.empty(entry.size, dtype=torch.uint8, pin_memory=pin)
        fd = self._fd(entry.file)
        try:
            n = os.preadv(fd, [memoryview(host.numpy())], entry.offset)
        except OSError as exc:
            raise self._read_error(entry, exc) from None
        self._check(entry, n)
        if self.method == "fadvise" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, entry.offset, entry.size, os.POSIX_FADV_DONTNEED)
        return host

    def _read_direct(self, fd: int, entry: ExpertEntry, pin: bool) -> torch.Tensor:
        start = entry.offset - entry.offset % _PAGE
        end = -(-(entry.offset + entry.size) // _PAGE) * _PAGE
        span = end - start
        base = torch.empty(span + _PAGE, dtype=torch.uint8, pin_memory=pin)
        skip = (-base.data_ptr()) % _PAGE                 # page-align the buffer itself
        buf = base[skip: skip + span]
        n = os.preadv(fd, [memoryview(buf.numpy())], start)
        head = entry.offset - start
        self._check(entry, min(max(n - head, 0), entry.size))
        return buf[head: head + entry.size]

    def _read_error(self, entry: ExpertEntry, exc: OSError) -> PackedError:
        return PackedError(f"{self.ckpt.path / entry.file}: reading layer {entry.layer} expert "
                           f"{entry.expert} failed ({exc.strerror or exc}); check the drive, or "
                           f"repack the model onto another")

    def _check(self, entry: ExpertEntry, n: int) -> None:
        if n != entry.size:
            raise PackedError(f"{self.ckpt.path / entry.file}: read {n} of {entry.size} bytes of "
                              f"layer {entry.layer} expert {entry.expert}; the file is truncated "
                              f"— repack the model")

    def _direct_fd(self, file: str) -> int | None:
        fd = self._direct_fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._direct_fds.get(file)
                if fd is None:
                    if not hasattr(os, "O_DIRECT"):   # macOS: no O_DIRECT flag to ask for
                        self.method = _fallback()
                        return None
                    try:
                        fd = os.open(self.ckpt.path / file, os.O_RDONLY | os.O_DIRECT)
                    except OSError:
                        self.method = _fallback()
                        return None
                    self._direct_fds[file] = fd
        return fd

    def read_bytes(self, entry: ExpertEntry, start: int, size: int) -> bytes:
        """`size` bytes at `start` within expert `entry`'s record (e.g. a blob header)."""
        return os.pread(self._fd(entry.file), size, entry.offset + start)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(self.ckpt.path / file, os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close the layer files (records already read stay usable)."""
        for attr in ("_fds", "_direct_fds"):
            fds = getattr(self, attr, {})  # absent when __init__ failed
            for fd in fds.values():
                os.close(fd)
            fds.clear()

    def __del__(self) -> None:
        self.close()


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
    from profiles.models.files import CheckpointFiles, TensorOut, copy_chunks
    from profiles.models.offload import load_non_expert

    try:  # tensor by tensor: the non-expert weights are never held twice
        files = CheckpointFiles.open_files(ckpt.path, (ckpt.path / NON_EXPERT,))
        load_non_expert(model, emap, ((n, TensorOut(n, i.dtype, i.shape,
                                                    lambda n=n: copy_chunks(files, n)))
                                      for n, i in files.tensors.items()),
                        str(ckpt.path / NON_EXPERT))
    except MoeszError as exc:
        raise PackedError(f"{exc}; repack the model") from None
    model.eval()
    return model, emap


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer saved with a packed checkpoint, or None (`profiles.models.loading`)."""
    from profiles.models.loading import _tokenizer

    return _tokenizer(Path(path), trust_remote_code)


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
    from profiles.models.fingerprint import fingerprint_mismatch

    reason = fingerprint_mismatch(policy.fingerprint, ckpt.fingerprint, where)
    if reason:
        raise PolicyError(f"{reason} (the packed checkpoint {ckpt.path})")
    g = ckpt.geometry
    for layer in g.moe_layers:
        for e in range(g.experts_per_layer):
            a, b = policy.expert_specs(layer, e), packed.expert_specs(layer, e)
            if a != b:
                raise PolicyError(f"{where} stores layer {layer} expert {e} as {a.describe()}, but "
                                  f"{ckpt.path} was packed with {b.describe()}; repack with "
                                  f"`moesz pack` or drop --policy")
