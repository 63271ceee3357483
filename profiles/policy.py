"""Storage policies: how each routed expert is stored for transfer, and applying one to a model.

A `Policy` gives every routed expert a `StorageSpec` (codec, bound mode, level, codec options): a
default, per-layer overrides and per-expert overrides, most specific first. It is the one format
every later command reads (`--policy FILE` accepts a policy file or a plan file holding one under
the key "policy"), versioned and tied to a model by its fingerprint.

`apply_policy` puts each expert tensor through a REAL encode -> decode round trip of its codec, so
the model computes with exactly the weights a receiver would decode, and reports the bytes each
expert occupies in storage and in transfer (measured blob sizes, header included). For comparison
with the MoE-compression study (Ma et al., SC'25 workshops, arXiv 2509.07727), which added noise
instead of compressing, a surrogate replaces the round trip of error-bounded specs: Gaussian noise
N(0, sigma = e) or uniform noise on [-e, e], e the absolute bound the codec would apply, seeded per
(seed, layer, expert, tensor). The original weights come back bit for bit on exit, through
`profiles.models.restore.WeightRestorer` (compressed XOR residuals, not a copy of the experts).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from profiles.errors import MoeszError, PolicyError
from profiles.fileio import atomic_write_json

KIND = "policy"
SCHEMA_VERSION = 1
# documents that carry a policy under the key "policy", and the schema version this moesz writes
# (a plan is `planner.plan`'s document; it takes its version from here, the lower package)
PLAN_KIND, PLAN_SCHEMA_VERSION = "plan", 1
PACKED_KIND, PACKED_SCHEMA_VERSION = "packed_checkpoint", 1
CONTAINERS = {PLAN_KIND: PLAN_SCHEMA_VERSION, PACKED_KIND: PACKED_SCHEMA_VERSION}
SURROGATES = ("gaussian", "uniform")
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class StorageSpec:
    """How one expert is stored: a codec, its bound (None for codecs without one) and options."""

    codec: str = "raw"
    mode: str | None = None
    level: float | None = None
    codec_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from profiles.codecs import get_codec
        from profiles.codecs.bounds import check_request

        try:
            codec = get_codec(self.codec)
            if codec.error_bounded:
                if self.mode is None or self.level is None:
                    raise PolicyError(f"codec {self.codec!r} needs a bound: give mode and level "
                                      f"(e.g. {self.codec}:meanabs:0.5)")
                _, level = check_request(self.mode, self.level)
                object.__setattr__(self, "level", level)
            else:  # raw, lossless, rtn8, rtn4 ignore the bound
                object.__setattr__(self, "mode", None)
                object.__setattr__(self, "level", None)
            object.__setattr__(self, "codec_options",
                               dict(codec.check_options(dict(self.codec_options))))
        except PolicyError:
            raise
        except MoeszError as exc:
            raise PolicyError(str(exc)) from None

    def __hash__(self) -> int:
        return hash((self.codec, self.mode, self.level, tuple(sorted(self.codec_options.items()))))

    @property
    def error_bounded(self) -> bool:
        return self.mode is not None

    @classmethod
    def parse(cls, text: str) -> "StorageSpec":
        """Parse `CODEC[:MODE:LEVEL][,option=value…]`.

        Examples: `szp:meanabs:0.5`, `lossless`, `sz3:abs:1e-3,predictor=lorenzo`.
        """
        head, *pairs = text.split(",")
        parts = head.split(":")
        if len(parts) not in (1, 3):
            raise PolicyError(f"storage spec {text!r} is not CODEC or CODEC:MODE:LEVEL "
                              f"(e.g. szp:meanabs:0.5, lossless, raw)")
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise PolicyError(f"storage spec {text!r}: option {pair!r} is not key=value")
            options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value
        if len(parts) == 1:
            return cls(parts[0].strip(), codec_options=options)
        return cls(parts[0].strip(), parts[1].strip(), parts[2].strip(), options)

    def describe(self) -> str:
        text = self.codec + (f":{self.mode}:{self.level:g}" if self.error_bounded else "")
        return text + "".join(f",{k}={v}" for k, v in sorted(self.codec_options.items()))

    def to_dict(self) -> dict:
        return {"codec": self.codec, "mode": self.mode, "level": self.level,
                "codec_options": dict(self.codec_options)}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "storage spec") -> "StorageSpec":
        if not isinstance(d, Mapping) or "codec" not in d:
            raise PolicyError(f"{where}: expected an object with 'codec' (and 'mode', 'level')")
        unknown = set(d) - {"codec", "mode", "level", "codec_options"}
        if unknown:
            raise PolicyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; valid: "
                              f"codec, mode, level, codec_options")
        return cls(d["codec"], d.get("mode"), d.get("level"), d.get("codec_options") or {})


@dataclass(frozen=True)
class Policy:
    """Per-expert storage: `experts[(layer, expert)]`, else `layers[layer]`, else `default`."""

    schema_version: int = SCHEMA_VERSION
    fingerprint: str | None = None
    default: StorageSpec = field(default_factory=StorageSpec)
    layers: Mapping[int, StorageSpec] = field(default_factory=dict)
    experts: Mapping[tuple[int, int], StorageSpec] = field(default_factory=dict)

    def spec_for(self, layer: int, expert: int) -> StorageSpec:
        spec = self.experts.get((layer, expert))
        return spec if spec is not None else self.layers.get(layer, self.default)

    @classmethod
    def uniform(cls, codec: str, mode: str | None = None, level: float | None = None,
                fingerprint: str | None = None, **codec_options) -> "Policy":
        """Every routed expert stored the same way."""
        return cls(fingerprint=fingerprint, default=StorageSpec(codec, mode, level, codec_options))

    @classmethod
    def none(cls, fingerprint: str | None = None) -> "Policy":
        """No compression: every expert raw."""
        return cls(fingerprint=fingerprint)

    def with_fingerprint(self, fingerprint: str | None) -> "Policy":
        return Policy(self.schema_version, fingerprint, self.default, dict(self.layers),
                      dict(self.experts))

    def check(self, moe_layers, experts_per_layer: int, fingerprint: str | None,
              where: str = "policy") -> None:
        """Raise PolicyError unless this policy fits a model with these layers and fingerprint."""
        from profiles.models.fingerprint import fingerprint_mismatch

        reason = fingerprint_mismatch(self.fingerprint, fingerprint, where)
        if reason:
            raise PolicyError(f"{reason}; make a policy for this model")
        moe = set(moe_layers)
        for layer in list(self.layers) + [lay for lay, _ in self.experts]:
            if layer not in moe:
                raise PolicyError(f"{where} names layer {layer}, which is not an MoE layer of this "
                                  f"model (MoE layers: {_ranges(moe)})")
        for layer, expert in self.experts:
            if not 0 <= expert < experts_per_layer:
                raise PolicyError(f"{where} names expert {expert} of layer {layer}; this model "
                                  f"has experts 0-{experts_per_layer - 1}")

    def to_dict(self) -> dict:
        return {"kind": KIND, "schema_version": self.schema_version,
                "fingerprint": self.fingerprint, "default": self.default.to_dict(),
                "layers": {str(k): v.to_dict() for k, v in sorted(self.layers.items())},
                "experts": {f"{lay}:{e}": v.to_dict()
                            for (lay, e), v in sorted(self.experts.items())}}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "policy") -> "Policy":
        if not isinstance(d, Mapping):
            raise PolicyError(f"{where}: expected a JSON object")
        if d.get("kind", KIND) != KIND:
            raise PolicyError(f"{where}: field 'kind' is {d.get('kind')!r}, expected {KIND!r}")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise PolicyError(f"{where}: schema_version is {d.get('schema_version')!r}, expected "
                              f"{SCHEMA_VERSION}; regenerate it with this version of moesz")
        try:
            layers = {int(k): StorageSpec.from_dict(v, f"{where} layer {k}")
                      for k, v in (d.get("layers") or {}).items()}
            experts = {}
            for k, v in (d.get("experts") or {}).items():
                lay, _, e = str(k).partition(":")
                experts[(int(lay), int(e))] = StorageSpec.from_dict(v, f"{where} expert {k}")
        except ValueError:
            raise PolicyError(f"{where}: layer keys must be integers and expert keys "
                              f"'LAYER:EXPERT', e.g. '3' and '3:5'") from None
        return cls(SCHEMA_VERSION, d.get("fingerprint"),
                   StorageSpec.from_dict(d.get("default") or {"codec": "raw"}, f"{where} default"),
                   layers, experts)

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Policy":
        """Read a policy file, or a plan file that holds a policy under the key "policy"."""
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"{path}: no such policy or plan file; check the path")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PolicyError(f"{path}: not valid JSON; expected a policy or plan file") from None
        embedded = isinstance(doc, dict) and isinstance(doc.get("policy"), dict)
        if embedded and doc.get("kind") != KIND:
            kind = doc.get("kind")
            if kind not in CONTAINERS:
                raise PolicyError(f"{path}: field 'kind' is {kind!r}; expected a policy, a plan "
                                  f"or a packed-checkpoint manifest")
            if doc.get("schema_version") != CONTAINERS[kind]:
                raise PolicyError(f"{path}: field 'schema_version' is "
                                  f"{doc.get('schema_version')!r}, expected {CONTAINERS[kind]} for "
                                  f"a {kind}; make it again with this version of moesz")
            return cls.from_dict(doc["policy"], f"{path} (policy in {kind})")
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise PolicyError(f"{path}: neither a policy (kind 'policy') nor a plan holding one "
                              f"under the key 'policy'")
        return cls.from_dict(doc, str(path))


@dataclass(frozen=True)
class ExpertStorage:
    """One expert under a policy. Bytes are measured blob sizes (header included) in storage and
    transfer (`stored_bytes`, None when a surrogate ran without measuring) and the checkpoint bytes
    it replaces (`original_bytes`, in the checkpoint's dtype: FP8 experts count 1 byte a value)."""

    layer: int
    expert: int
    spec: str
    abs_bound: float | None   # largest bound applied over the expert's tensors
    stored_bytes: int | None
    original_bytes: int


@dataclass(frozen=True)
class PolicyReport:
    experts: tuple[ExpertStorage, ...]
    surrogate: str | None
    seed: int
    restore_bytes: int        # held to restore the originals (compressed XOR residuals)

    @property
    def stored_bytes(self) -> int | None:
        sizes = [e.stored_bytes for e in self.experts]
        return None if any(s is None for s in sizes) else sum(sizes)

    @property
    def original_bytes(self) -> int:
        return sum(e.original_bytes for e in self.experts)

    @property
    def ratio(self) -> float | None:
        stored = self.stored_bytes
        return self.original_bytes / stored if stored else None


@contextmanager
def apply_policy(loaded, policy: Policy, surrogate: str | None = None, seed: int = 0,
                 progress: Progress | None = None, measure_bytes: bool = True
                 ) -> Iterator[PolicyReport]:
    """Store-and-reload every routed expert as `policy` says; restore the exact weights on exit.

    Args:
        loaded: a `profiles.models.LoadedModel`.
        policy: the policy; it must fit the model (fingerprint, MoE layers, expert indices).
        surrogate: None for real codec round trips, "gaussian" or "uniform" for noise surrogates
            on error-bounded specs (other specs still take their real round trip).
        seed: seeds the surrogate noise (real codecs are deterministic and ignore it).
        progress: `progress(done, total, label)` once per expert.
        measure_bytes: with a surrogate, still encode each expert to measure its stored bytes.

    Yields:
        A `PolicyReport` with per-expert stored and original bytes.

    Raises:
        PolicyError: the policy does not fit the model or the surrogate is unknown.
    """
    from profiles.codecs import compressed_nbytes, roundtrip
    from profiles.models.restore import WeightRestorer

    if surrogate is not None and surrogate not in SURROGATES:
        raise PolicyError(f"surrogate {surrogate!r} is unknown; choose {', '.join(SURROGATES)} "
                          f"or none for real codec round trips")
    geometry = loaded.geometry
    emap = loaded.expert_map
    policy.check(emap.moe_layers, emap.experts_per_layer, loaded.fingerprint)
    if getattr(loaded, "offload", None) is not None:
        with _offloaded_policy(loaded, policy, surrogate, progress) as report:
            yield report
        return
    restorer, rows, raw_sizes = WeightRestorer(), [], {}
    try:
        for i, ref in enumerate(emap.experts):
            spec = policy.spec_for(ref.layer, ref.expert)
            stored, bounds = 0, []
            for name, t in ref.tensors.items():
                args = dict(codec=spec.codec, mode=spec.mode, level=spec.level,
                            **spec.codec_options)
                if surrogate is not None and spec.error_bounded:
                    size = compressed_nbytes(t, **args) if measure_bytes else None
                    bounds.append(_surrogate_bound(t, spec))
                    restorer.replace(t, _noisy(t, bounds[-1], surrogate, seed, ref.layer,
                                               ref.expert, name))
                elif spec.codec == "raw":  # raw stores the original bytes: nothing changes
                    key = (tuple(t.shape), t.dtype)  # its size depends on nothing else
                    if key not in raw_sizes:
                        raw_sizes[key] = compressed_nbytes(t, **args)
                    size = raw_sizes[key]
                else:
                    decoded, blob = roundtrip(t, **args)
                    size = blob.nbytes
                    bounds.append(blob.abs_bound)
                    restorer.replace(t, decoded)
                stored = None if size is None or stored is None else stored + size
            known = [b for b in bounds if b is not None]
            rows.append(ExpertStorage(ref.layer, ref.expert, spec.describe(),
                                      max(known) if known else None, stored,
                                      geometry.bytes_per_expert))
            if progress is not None:
                progress(i + 1, len(emap.experts), f"layer {ref.layer} expert {ref.expert}")
        yield PolicyReport(tuple(rows), surrogate, seed, restorer.nbytes)
    finally:
        restorer.restore()


@contextmanager
def _offloaded_policy(loaded, policy: Policy, surrogate: str | None, progress
                      ) -> Iterator[PolicyReport]:
    """`apply_policy` for a model whose experts stay on disk: the experts are served from the
    policy's real blobs (each encoded from the files, decoded when its layer runs); one pass
    over every expert the policy encodes measures the stored bytes first (raw experts' sizes
    follow from their shapes, so they are not read)."""
    from profiles.codecs import compressed_nbytes
    from profiles.models.offload import FileReader

    reader = getattr(loaded.offload.reader, "source", None)
    if reader is None:
        raise PolicyError(f"{loaded.spec} is a packed checkpoint: its experts are stored under "
                          f"its own policy; apply another policy to the original checkpoint")
    if surrogate is not None:
        raise PolicyError("surrogate noise edits weights in memory; a model served from disk "
                          "(--host-mem) takes real codec round trips only")
    files = FileReader(reader, policy)
    g, emap, rows = loaded.geometry, loaded.expert_map, []
    raw_bytes = None
    with loaded.offload.using(files):
        for i, (layer, e) in enumerate((r.layer, r.expert) for r in emap.experts):
            spec = policy.spec_for(layer, e)
            if spec.codec == "raw":
                if raw_bytes is None:  # the same for every expert: one shape, one dtype
                    raw_bytes = sum(compressed_nbytes(torch.zeros(shape, dtype=reader.dtype),
                                                      codec="raw")
                                    for _, shape in g.expert_tensor_shapes)
                rows.append(ExpertStorage(layer, e, spec.describe(), None, raw_bytes,
                                          g.bytes_per_expert))
                if progress is not None:
                    progress(i + 1, len(emap.experts), f"layer {layer} expert {e}")
                continue
            rec = loaded.offload.record((layer, e))
            bounds = [b.abs_bound for b in (rec.blobs or {}).values() if b.abs_bound]
            stored = (sum(b.nbytes for b in rec.blobs.values()) if rec.blobs is not None else
                      sum(compressed_nbytes(t, codec="raw") for t in rec.tensors.values()))
            del rec   # held past the loop, it would sit on top of the host budget
            rows.append(ExpertStorage(layer, e, spec.describe(),
                                      max(bounds) if bounds else None, stored,
                                      g.bytes_per_expert))
            if progress is not None:
                progress(i + 1, len(emap.experts), f"layer {layer} expert {e}")
        yield PolicyReport(tuple(rows), None, 0, 0)


def _surrogate_bound(t: torch.Tensor, spec: StorageSpec) -> float:
    """e for a tensor: the absolute bound the codec would apply (same statistics, same fp32
    rounding down), so a surrogate and a real round trip of one spec share their bound."""
    from profiles.codecs.bounds import floor_f32, resolve, tensor_stats

    return floor_f32(resolve(spec.mode, spec.level, tensor_stats(t.detach(), spec.mode)))


def _noisy(t: torch.Tensor, bound: float, surrogate: str, seed: int, layer: int, expert: int,
           name: str) -> torch.Tensor:
    """t + noise in fp32, rounded back to t's dtype; the noise depends only on the seed and the
    tensor's identity, not on the order tensors are visited."""
    key = hashlib.blake2b(f"{seed}|{layer}|{expert}|{name}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
    if surrogate == "gaussian":
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * bound
    else:
        noise = (torch.rand(t.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return t.detach().float() + noise.to(t.device)


def _ranges(values) -> str:
    from profiles.models.expert_map import format_ranges

    return format_ranges(values)
