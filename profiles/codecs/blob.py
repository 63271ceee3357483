"""The self-describing compressed blob: one tensor, its codec parameters, its payload, a CRC32.

Binary layout (little-endian), version 1; no pickle anywhere:

    offset  size  field
    0       8     magic b"MOESZBLB"
    8       2     container format version (uint16) = 1
    10      4     header length H (uint32)
    14      H     header: UTF-8 JSON object (keys below)
    14+H    8     payload length P (uint64)
    22+H    P     payload (codec-specific bytes)
    22+H+P  4     CRC32 (zlib) of every byte before it

Header keys: `codec`, `codec_version`, `dtype`, `shape`, `mode`, `level`, `abs_bound`, `options`,
`lossless_fallback`, `fallback_reason`, `meta` (codec-specific decoding parameters).
`Blob.nbytes` counts every one of these bytes, so ratios include the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from profiles.codecs.dtypes import DTYPES, itemsize
from profiles.errors import CodecError
from profiles.fileio import atomic_write_bytes

MAGIC = b"MOESZBLB"
CONTAINER_VERSION = 1
_PREFIX = struct.Struct("<8sHI")   # magic, version, header length
_PAYLEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")
FIXED_NBYTES = _PREFIX.size + _PAYLEN.size + _CRC.size   # 26 bytes around header and payload


@dataclass(frozen=True, eq=False)
class Blob:
    """One compressed tensor. Build with `profiles.codecs.encode`; read back with `decode`.

    Attributes:
        codec: codec name (`szp`, `sz3`, ...).
        codec_version: version of that codec's payload format.
        dtype: original dtype short name (`bf16`, `fp16`, `fp32`, `fp8_e4m3`).
        shape: original shape.
        mode: bound mode as requested (`abs`, `rel`, `meanabs`, `std`); None for codecs without one.
        level: requested bound value in that mode; None for codecs without one.
        abs_bound: absolute bound actually applied (for rtn: the measured max error); None for
            raw/lossless and for lossless fallbacks.
        options: codec options after defaults were filled in.
        lossless_fallback: True when the payload is lossless instead of the requested codec.
        fallback_reason: why the fallback happened, or None.
        meta: codec-specific decoding parameters (JSON-serializable).
        payload: the compressed bytes as a 1-D uint8 numpy array.
    """

    codec: str
    codec_version: int
    dtype: str
    shape: tuple[int, ...]
    mode: str | None
    level: float | None
    abs_bound: float | None
    options: dict[str, Any]
    lossless_fallback: bool
    fallback_reason: str | None
    meta: dict[str, Any]
    payload: np.ndarray = field(repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def original_nbytes(self) -> int:
        """Bytes of the tensor in its ORIGINAL dtype (bf16: 2 per value, fp8: 1)."""
        return self.numel * itemsize(self.dtype)

    @property
    def payload_nbytes(self) -> int:
        return int(self.payload.size)

    @property
    def header_nbytes(self) -> int:
        """Bytes of everything that is not payload: magic, version, lengths, JSON header, CRC."""
        return FIXED_NBYTES + len(self._header_json())

    @property
    def nbytes(self) -> int:
        """Every stored byte: header + payload (what `to_bytes()` returns)."""
        return self.header_nbytes + self.payload_nbytes

    @property
    def ratio(self) -> float:
        """original_nbytes / nbytes (measured on this blob, header included)."""
        return self.original_nbytes / self.nbytes

    def header_dict(self) -> dict[str, Any]:
        return {
            "codec": self.codec, "codec_version": self.codec_version, "dtype": self.dtype,
            "shape": list(self.shape), "mode": self.mode, "level": self.level,
            "abs_bound": self.abs_bound, "options": self.options,
            "lossless_fallback": self.lossless_fallback, "fallback_reason": self.fallback_reason,
            "meta": self.meta,
        }

    def _header_json(self) -> bytes:
        return json.dumps(self.header_dict(), separators=(",", ":"), sort_keys=True,
                          allow_nan=False).encode("utf-8")

    def to_bytes(self) -> bytes:
        """Serialize to the binary layout in the module docstring."""
        header = self._header_json()
        head = _PREFIX.pack(MAGIC, CONTAINER_VERSION, len(header)) + header \
            + _PAYLEN.pack(self.payload_nbytes)
        payload = memoryview(np.ascontiguousarray(self.payload, dtype=np.uint8)).cast("B")
        crc = zlib.crc32(payload, zlib.crc32(head))
        return b"".join([head, payload, _CRC.pack(crc)])

    def save(self, path: str | os.PathLike) -> None:
        """Write the blob to `path` atomically."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Blob":
        """Read a blob file written by `save`; raises CodecError if missing or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise CodecError(f"{path}: no such blob file; check the path")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    @staticmethod
    def read_header(data, source: str = "blob") -> dict[str, Any]:
        """The header dict of a blob from its leading bytes alone (magic, version, header), to
        learn its codec and fallback without reading the payload; nothing is CRC-checked.

        Raises:
            CodecError: the bytes are not the start of a moesz blob of this container version.
        """
        buf = memoryview(data).cast("B")
        if len(buf) < _PREFIX.size:
            raise CodecError(f"{source}: {len(buf)} bytes is shorter than a blob's prefix")
        magic, version, hlen = _PREFIX.unpack_from(buf, 0)
        if magic != MAGIC or version != CONTAINER_VERSION or _PREFIX.size + hlen > len(buf):
            raise CodecError(f"{source}: not the start of a moesz blob (container version "
                             f"{CONTAINER_VERSION})")
        try:
            head = json.loads(bytes(buf[_PREFIX.size: _PREFIX.size + hlen]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            head = None
        if not isinstance(head, dict):
            raise CodecError(f"{source}: blob header is malformed; re-encode it")
        return head

    @classmethod
    def from_bytes(cls, data, source: str = "blob") -> "Blob":
        """Parse bytes written by `to_bytes`, checking magic, lengths and CRC32 before anything else.

        Raises:
            CodecError: the data is truncated, corrupt (CRC mismatch) or not a moesz blob.
        """
        buf = memoryview(data).cast("B")
        total = len(buf)
        if total < FIXED_NBYTES:
            raise CodecError(f"{source}: {total} bytes is shorter than any blob ({FIXED_NBYTES}); "
                             f"the data is truncated")
        magic, version, hlen = _PREFIX.unpack_from(buf, 0)
        if magic != MAGIC:
            raise CodecError(f"{source}: not a moesz blob (magic {bytes(magic)!r}, expected {MAGIC!r})")
        if version != CONTAINER_VERSION:
            raise CodecError(f"{source}: blob container version {version} is not supported "
                             f"(this moesz reads version {CONTAINER_VERSION}); re-encode it")
        hstart = _PREFIX.size
        if hstart + hlen + _PAYLEN.size + _CRC.size > total:
            raise CodecError(f"{source}: blob is truncated (header says {hlen} header bytes, "
                             f"only {total} bytes in all)")
        (plen,) = _PAYLEN.unpack_from(buf, hstart + hlen)
        pstart = hstart + hlen + _PAYLEN.size
        if pstart + plen + _CRC.size != total:
            raise CodecError(f"{source}: blob length {total} does not match its header "
                             f"({pstart + plen + _CRC.size} expected); the data is truncated or "
                             f"has trailing bytes")
        (stored_crc,) = _CRC.unpack_from(buf, total - _CRC.size)
        crc = zlib.crc32(buf[: total - _CRC.size])
        if crc != stored_crc:
            raise CodecError(f"{source}: CRC32 mismatch (stored {stored_crc:08x}, computed "
                             f"{crc:08x}); the blob is corrupt")
        try:
            head = json.loads(bytes(buf[hstart:hstart + hlen]).decode("utf-8"))
            blob = cls(
                codec=str(head["codec"]), codec_version=int(head["codec_version"]),
                dtype=str(head["dtype"]), shape=tuple(int(s) for s in head["shape"]),
                mode=head["mode"], level=None if head["level"] is None else float(head["level"]),
                abs_bound=None if head["abs_bound"] is None else float(head["abs_bound"]),
                options=dict(head["options"]), lossless_fallback=bool(head["lossless_fallback"]),
                fallback_reason=head["fallback_reason"], meta=dict(head["meta"]),
                payload=np.frombuffer(buf, dtype=np.uint8, count=plen, offset=pstart),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CodecError(f"{source}: blob header is malformed ({exc}); re-encode it") from None
        if blob.dtype not in DTYPES:
            raise CodecError(f"{source}: blob dtype {blob.dtype!r} is unknown; valid: "
                             f"{', '.join(DTYPES)}")
        return blob
