"""A checkpoint's safetensors files read as files: headers, shards and memory-mapped tensors.

Nothing here builds a model or loads a weight it is not asked for. `CheckpointFiles.open(DIR)`
reads `model.safetensors.index.json` when the checkpoint is sharded (every shard it names must
exist) or every `*.safetensors` file otherwise, and checks each header against its file before
anything trusts it: the JSON parses, every tensor's byte range is as long as its dtype and shape
say, ranges neither overlap nor run past the end of the file (a truncated shard), and the index
agrees with the shards. Tensors are then read with positioned reads (`read`, `read_at`) into arrays
the caller owns: only the bytes asked for are read and nothing stays mapped, so the resident memory
of a reader is what it holds, never the checkpoint. (Memory-mapping the shards was measured first:
the kernel's read-ahead on each page fault made the fingerprint's 64 samples per tensor cost 3.5
GB of resident pages on a 6.3 GB checkpoint.)

The safetensors format: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}` (offsets relative to the byte after the
header), then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from profiles.errors import ModelError

INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype -> (bytes per value, numpy dtype of the raw bits, torch dtype)
ST_DTYPES: dict[str, tuple[int, str, torch.dtype | None]] = {
    "BF16": (2, "<u2", torch.bfloat16), "F16": (2, "<f2", torch.float16),
    "F32": (4, "<f4", torch.float32), "F64": (8, "<f8", torch.float64),
    "F8_E4M3": (1, "u1", torch.float8_e4m3fn), "F8_E5M2": (1, "u1", torch.float8_e5m2),
    "I64": (8, "<i8", torch.int64), "I32": (4, "<i4", torch.int32), "I16": (2, "<i2", torch.int16),
    "I8": (1, "i1", torch.int8), "U8": (1, "u1", torch.uint8), "BOOL": (1, "u1", torch.bool),
    "E8M0": (1, "u1", None), "F8_E8M0": (1, "u1", None),
}
# moesz's storage-format names of the floating safetensors dtypes
STORAGE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8_e4m3",
                 "MXFP4": "mxfp4"}  # MXFP4: gpt-oss's blocks and scales (profiles.models.layout)
_HEADER_LIMIT = 100 * 2**20  # the safetensors library refuses headers over 100 MB too


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors file: where its bytes are and what they hold."""

    name: str
    file: Path
    dtype: str               # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int              # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class CheckpointFiles:
    """Every tensor of a checkpoint directory's safetensors files, by name, unread.

    Attributes:
        path: the checkpoint directory.
        tensors: name -> `TensorInfo`, over all shards.
        files: the safetensors files, in shard order.
    """

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], files: tuple[Path, ...]):
        self.path = path
        self.tensors = tensors
        self.files = files
        self._fds: dict[Path, int] = {}

    @classmethod
    def open(cls, path: str | Path) -> "CheckpointFiles":
        """Read and check the headers of the checkpoint in directory `path`.

        Raises:
            ModelError: no safetensors (pickle-only checkpoints are refused, never unpickled), a
                shard the index names is missing, a header that is not JSON or lies about its
                offsets, a shard shorter than its header says, or an index that disagrees with
                the shards.
        """
        path = Path(path)
        index = path / INDEX
        if index.is_file():
            files, weight_map = _read_index(index)
        else:
            files, weight_map = tuple(sorted(path.glob("*.safetensors"))), None
        if not files:
            _refuse_without_safetensors(path)
        return cls.open_files(path, files, weight_map)

    @classmethod
    def open_files(cls, path: Path, files: tuple[Path, ...],
                   weight_map: dict[str, str] | None = None) -> "CheckpointFiles":
        """Read and check the headers of these safetensors `files` (of directory `path`)."""
        index = path / INDEX
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for info in _read_header(file):
                if info.name in tensors:
                    raise ModelError(f"{file}: tensor {info.name} is also in "
                                     f"{tensors[info.name].file.name}; the shards overlap — "
                                     f"re-export the checkpoint")
                tensors[info.name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                found = tensors.get(name)
                if found is None or found.file.name != Path(shard).name:
                    where = "no shard holds it" if found is None else f"it is in {found.file.name}"
                    raise ModelError(f"{index}: lists {name} in {shard}, but {where}; the index "
                                     f"and the shards disagree — re-export the checkpoint")
        return cls(path, tensors, files)

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor's data, all shards."""
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.path}: no tensor {name!r} in the safetensors files") from None

    def read(self, name: str, start: int = 0, count: int | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Values `start` to `start + count` (flat) of tensor `name`, read with positioned reads
        into `out` or a new array of its raw dtype (bf16 as uint16 bits, FP8 as uint8). Nothing
        stays mapped or cached in the process, so memory is the array itself."""
        info = self.info(name)
        size, raw = ST_DTYPES[info.dtype][0], np.dtype(ST_DTYPES[info.dtype][1])
        count = info.numel - start if count is None else count
        if start < 0 or count < 0 or start + count > info.numel:
            raise ModelError(f"{self.path}: values {start}-{start + count} of {name} are outside "
                             f"its {info.numel}")
        if out is None:
            out = np.empty(count, dtype=raw)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = self._fd(info.file)
        pos, done = info.offset + start * size, 0
        while done < count * size:
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise ModelError(f"{info.file}: ended while reading {name}; the file is "
                                 f"truncated — re-download it")
            done += n
        return out

    def read_at(self, name: str, positions: np.ndarray) -> bytes:
        """The stored bytes of the elements of tensor `name` at flat `positions` (one positioned
        read each: the fingerprint's samples)."""
        info = self.info(name)
        size, fd = ST_DTYPES[info.dtype][0], self._fd(info.file)
        return b"".join(os.pread(fd, size, info.offset + int(p) * size) for p in positions)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` read into memory, in its stored dtype."""
        info = self.info(name)
        dtype = ST_DTYPES[info.dtype][2]
        if dtype is None:
            raise ModelError(f"{self.path}: tensor {name} is {info.dtype}, which torch cannot "
                             f"hold; read it with .read()")
        arr = self.read(name)
        return torch.from_numpy(arr.view(np.uint8)).view(dtype).reshape(info.shape)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close the files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class TensorOut:
    """A tensor to write with `write_safetensors`: its header fields and a producer of its bytes
    (called once, yielding the data in order, in pieces of any size)."""

    name: str
    dtype: str               # safetensors dtype name
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes | np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[self.dtype][0]


def write_safetensors(path: str | Path, tensors: list[TensorOut],
                      metadata: dict[str, str] | None = None,
                      progress: Callable[[int], None] | None = None) -> int:
    """Write a safetensors file tensor by tensor, piece by piece, so that memory stays at one
    piece whatever the file's size (the safetensors library's `save_file` needs every tensor in
    memory at once). The caller writes to a temporary name and renames (`profiles.fileio`).

    Args:
        path: the file to write.
        tensors: in file order.
        metadata: the header's `__metadata__` (e.g. {"format": "pt"}).
        progress: called with the bytes written after each piece.

    Returns:
        The file's size in bytes.

    Raises:
        ValueError: a producer gave more or fewer bytes than its dtype and shape need.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors:
            written = 0
            for piece in _pieces(t.chunks()):
                fh.write(piece)
                written += len(piece)
                if progress is not None:
                    progress(len(piece))
            if written != t.nbytes:
                raise ValueError(f"{t.name}: {written} bytes produced, {t.nbytes} expected")
        return fh.tell()


def copy_chunks(files: "CheckpointFiles", name: str, piece_values: int = 1 << 24
                ) -> Iterator[np.ndarray]:
    """Tensor `name`'s raw values in pieces read from its shard (for `TensorOut`)."""
    n = files.info(name).numel
    for start in range(0, n, piece_values):
        yield files.read(name, start, min(piece_values, n - start))


def _pieces(chunks: Iterable[bytes | np.ndarray]) -> Iterator[bytes | memoryview]:
    for c in chunks:
        yield memoryview(np.ascontiguousarray(c).reshape(-1)).cast("B") \
            if isinstance(c, np.ndarray) else c


def _read_index(index: Path) -> tuple[tuple[Path, ...], dict[str, str]]:
    try:
        doc = json.loads(index.read_text())
        weight_map = dict(doc["weight_map"])
        if not all(isinstance(v, str) and v for v in weight_map.values()):
            raise ValueError("a shard name is not a string")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as exc:
        raise ModelError(f"{index}: not a safetensors index ({type(exc).__name__}); expected "
                         f"{{\"weight_map\": {{tensor: shard}}}} — re-export the checkpoint"
                         ) from None
    names = sorted(set(weight_map.values()))
    files = tuple(index.parent / n for n in names)
    for f in files:
        if not f.is_file():
            raise ModelError(f"{f}: listed in {index.name} but missing; download or copy the "
                             f"missing shard")
    return files, weight_map


def _read_header(file: Path) -> list[TensorInfo]:
    """The tensors of one safetensors file, each range checked against the header and the file."""
    size = file.stat().st_size
    bad = f"{file}: not a valid safetensors file"
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"{bad} ({size} bytes, shorter than a header); the file is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > _HEADER_LIMIT or 8 + n > size:
            raise ModelError(f"{bad} (header of {n} bytes in a {size}-byte file); the file is "
                             f"truncated or corrupt — re-download it")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{bad} (its header is not JSON); the file is corrupt — re-download "
                             f"it") from None
    if not isinstance(header, dict):
        raise ModelError(f"{bad} (its header is not a JSON object)")
    header.pop("__metadata__", None)
    base, out, ranges = 8 + n, [], []
    for name, entry in header.items():
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{bad} (tensor {name}: header entry lacks dtype, shape or "
                             f"data_offsets)") from None
        if dtype not in ST_DTYPES:
            raise ModelError(f"{file}: tensor {name} has dtype {dtype}, which moesz does not read; "
                             f"known: {', '.join(ST_DTYPES)}")
        expect = math.prod(shape) * ST_DTYPES[dtype][0]
        if begin < 0 or end - begin != expect or any(s < 0 for s in shape):
            raise ModelError(f"{bad} (tensor {name}: offsets {begin}-{end} hold {end - begin} "
                             f"bytes, its dtype and shape need {expect}); the header lies — the "
                             f"file is corrupt, re-download it")
        if base + end > size:
            raise ModelError(f"{file}: {size} bytes, but tensor {name} ends at byte {base + end}; "
                             f"the file is truncated — re-download it")
        ranges.append((begin, end, name))
        out.append(TensorInfo(name, file, dtype, shape, base + begin, end - begin))
    ranges.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise ModelError(f"{bad} (tensors {n0} and {n1} overlap at bytes {b1}-{e0}); the "
                             f"header lies — the file is corrupt, re-download it")
    return out


def _refuse_without_safetensors(path: Path) -> None:
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(f"{path}: only pickle checkpoints ({pickled[0]}); moesz reads "
                         f"safetensors only and never unpickles (pickle can run code) — convert "
                         f"with transformers' save_pretrained(..., safe_serialization=True) in a "
                         f"trusted environment (`moesz model info --no-fingerprint` reports the "
                         f"geometry of config.json)")
    raise ModelError(f"{path}: no *.safetensors weights; moesz model info still reports the "
                     f"geometry of config.json with --no-fingerprint")
