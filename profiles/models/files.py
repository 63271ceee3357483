"""A checkpoint's safetensors files read as files: headers, shards and memory-mapped tensors.

Nothing here builds a model or loads a weight it is not asked for. `CheckpointFiles.open(DIR)`
reads `model.safetensors.index.json` when the checkpoint is sharded (every shard it names must
exist) or every `*.safetensors` file otherwise, and checks each header against its file before
anything trusts it: the JSON parses, every tensor's byte range is as long as its dtype and shape
say, ranges neither overlap nor run past the end of the file (a truncated shard), and the index
agrees with the shards. A tensor is then read through `numpy.memmap` (`array`), so only the pages
touched are read, and the resident memory of a reader does not grow with the checkpoint.

The safetensors format: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}` (offsets relative to the byte after the
header), then the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

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
STORAGE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8_e4m3"}
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
        self._maps: dict[Path, np.memmap] = {}

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

    def array(self, name: str) -> np.ndarray:
        """The raw values of tensor `name` as a read-only memory-mapped numpy array (bf16 as
        uint16 bits, FP8 as uint8)."""
        info = self.info(name)
        mm = self._maps.get(info.file)
        if mm is None:
            mm = self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        raw = mm[info.offset: info.offset + info.nbytes]
        return raw.view(np.dtype(ST_DTYPES[info.dtype][1])).reshape(info.shape)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` read into memory (a copy), in its stored dtype."""
        info = self.info(name)
        dtype = ST_DTYPES[info.dtype][2]
        if dtype is None:
            raise ModelError(f"{self.path}: tensor {name} is {info.dtype}, which torch cannot "
                             f"hold; read it with .array()")
        arr = np.array(self.array(name))  # copy out of the map
        return torch.from_numpy(arr.reshape(-1).view(np.uint8)).view(dtype).reshape(info.shape)

    def close(self) -> None:
        """Drop the memory maps (the OS frees their pages)."""
        self._maps.clear()


def _read_index(index: Path) -> tuple[tuple[Path, ...], dict[str, str]]:
    try:
        doc = json.loads(index.read_text())
        weight_map = dict(doc["weight_map"])
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
                         f"trusted environment")
    raise ModelError(f"{path}: no *.safetensors weights; moesz model info still reports the "
                     f"geometry of config.json with --no-fingerprint")
