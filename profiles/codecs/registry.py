"""The codec interface and the registry of codecs by name.

A codec turns one contiguous tensor (original dtype) into a payload plus a small JSON-able `meta`
dict, and back. Bound resolution, NaN checks, lossless fallback and the blob container are handled
once, in `profiles.codecs.api`, so a codec only implements `encode_payload` / `decode_payload`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from profiles.errors import CodecError


@dataclass(frozen=True)
class Encoded:
    """What a codec returns from encoding: payload bytes, decoding parameters, applied bound.

    `abs_bound` overrides the requested bound in the blob (rtn reports its measured max error).
    """

    payload: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    abs_bound: float | None = None


class Codec:
    """Base class. Subclasses set the class attributes and implement the two payload methods."""

    name: ClassVar[str]
    format_version: ClassVar[int] = 1
    error_bounded: ClassVar[bool]
    gpu_decodable: ClassVar[bool]
    cpu_only: ClassVar[bool]
    description: ClassVar[str] = ""
    #: option name -> (default, tuple of valid values or None for "any int")
    option_spec: ClassVar[dict[str, tuple[Any, tuple | None]]] = {}
    #: options left out of the checked options while at their default, so that specs, profiles
    #: and blobs written before the option existed keep their labels (`strict`, default 1)
    implicit_options: ClassVar[frozenset[str]] = frozenset()
    #: older payload format versions this codec still decodes
    older_versions: ClassVar[tuple[int, ...]] = ()

    def reads_version(self, version: int) -> bool:
        """Whether blobs of this payload format version decode here."""
        return version == self.format_version or version in self.older_versions

    def availability(self) -> tuple[bool, str]:
        """(usable here, reason if not)."""
        return True, ""

    def saturation_reason(self, max_abs: float, abs_bound: float) -> str | None:
        """Why this bound cannot be applied to values up to `max_abs`, or None (error-bounded codecs)."""
        return None

    def payload_size(self, x: torch.Tensor, abs_bound: float | None,
                     options: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """(payload bytes, meta) without producing the payload, or None if only encoding can tell."""
        return None

    def decode_where(self) -> str:
        """Where decoding runs, in words, for `moesz codecs list`."""
        if self.cpu_only:
            return "CPU"
        return "CPU or GPU" if self.gpu_decodable else "CPU"

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options with defaults filled in; raises CodecError on unknown names or values."""
        unknown = sorted(set(options) - set(self.option_spec))
        if unknown:
            valid = ", ".join(self.option_spec) or "none"
            raise CodecError(f"codec {self.name!r}: unknown option(s) {', '.join(unknown)}; "
                             f"valid options: {valid}")
        out = {}
        for key, (default, choices) in self.option_spec.items():
            value = options.get(key, default)
            if choices is not None and value not in choices:
                raise CodecError(f"codec {self.name!r}: option {key}={value!r} is invalid; valid: "
                                 f"{', '.join(map(str, choices))}")
            if choices is None and not isinstance(value, int):
                raise CodecError(f"codec {self.name!r}: option {key}={value!r} must be an integer")
            if key in self.implicit_options and value == default:
                continue
            out[key] = value
        return out

    def encode_payload(self, x: torch.Tensor, abs_bound: float | None,
                       options: dict[str, Any]) -> Encoded:
        """Encode a contiguous tensor of its original dtype (any shape) under `abs_bound`."""
        raise NotImplementedError

    def decode_payload(self, payload: np.ndarray, meta: dict[str, Any], dtype: torch.dtype,
                       shape: tuple[int, ...], abs_bound: float | None, options: dict[str, Any],
                       device: torch.device) -> torch.Tensor:
        """Decode to a tensor on `device`: fp32 for lossy codecs, `dtype` for exact ones."""
        raise NotImplementedError


def payload_tensor(payload: np.ndarray) -> torch.Tensor:
    """A CPU uint8 tensor sharing memory with a (possibly read-only) payload array.

    Decoders only read it; the read-only warning torch gives for such buffers is silenced.
    """
    arr = np.ascontiguousarray(payload, dtype=np.uint8).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    _REGISTRY[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    """The codec registered under `name`; raises CodecError listing valid names."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CodecError(f"codec {name!r} is unknown; valid codecs: "
                         f"{', '.join(_REGISTRY)}") from None


def list_codecs() -> list[Codec]:
    """All registered codecs, in a stable order."""
    _load_builtin()
    return list(_REGISTRY.values())


def _load_builtin() -> None:
    if _REGISTRY:
        return
    from profiles.codecs import cuszp, lossless, raw, rtn, sz3, szp

    for codec in (sz3.Sz3Codec(), szp.SzpCodec(), cuszp.CuszpCodec(), lossless.LosslessCodec(),
                  rtn.RtnCodec(8), rtn.RtnCodec(4), raw.RawCodec()):
        register(codec)
    # the quantized formats users run (not error-bounded): group quantization, NF4, MXFP4, GGUF
    from profiles.codecs import quantized

    for codec in (quantized.GqCodec(), quantized.Nf4Codec(), quantized.Mxfp4Codec(),
                  *(quantized.KQuantCodec(t) for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                                                       "q8_0"))):
        register(codec)
    from profiles.codecs import ans

    register(ans.AnsCodec())
