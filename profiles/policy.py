"""Storage policies: how each routed expert is stored for transfer, and applying one to a model.

A `Policy` gives every routed expert a `StorageSpec` (codec, bound mode, level, codec options): a
default, per-layer overrides and per-expert overrides, most specific first. Each level may also
override single matrices of the expert (`matrices`: `gate_up`, `down`, and `gate`/`up`, split
out of a fused `gate_up_proj` where they differ from `gate_up`; `profiles.matrices`,
`profiles.models.gate_up`): for a matrix, the expert level's matrix entry,
then the expert level's spec, then the layer's matrix entry, the layer's spec, the default's
matrix entry, the default. Schema version 2 (version-1 files, which have no `matrices`, read
unchanged). It is the one format
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
SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)   # version 1: no `matrices` entries
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
                              f"codec, mode, level, codec_options (and matrices in a policy)")
        try:
            return cls(d["codec"], d.get("mode"), d.get("level"), d.get("codec_options") or {})
        except PolicyError as exc:
            raise PolicyError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class ExpertSpecs:
    """How each matrix of one expert is stored: a `StorageSpec` per matrix kind (all of
    `profiles.matrices.KINDS`; `gate` and `up` equal `gate_up` unless a policy names them)."""

    gate_up: StorageSpec
    down: StorageSpec
    gate: StorageSpec
    up: StorageSpec

    def for_matrix(self, kind: str) -> StorageSpec:
        return getattr(self, kind)

    def for_tensor(self, name: str) -> StorageSpec:
        """The spec of an expert tensor by its name (`down_proj`, `w1.weight`, ...)."""
        from profiles.matrices import matrix_of

        return getattr(self, matrix_of(name))

    @property
    def uniform(self) -> StorageSpec | None:
        """The one spec of every matrix, or None when matrices differ."""
        specs = {self.gate_up, self.down, self.gate, self.up}
        return self.gate_up if len(specs) == 1 else None

    def describe(self) -> str:
        """The spec's text when every matrix shares it, else `gate_up=...;down=...` (gate and up
        listed only where they differ from gate_up)."""
        if self.uniform is not None:
            return self.uniform.describe()
        parts = [("gate_up", self.gate_up)]
        parts += [(k, getattr(self, k)) for k in ("gate", "up") if getattr(self, k) != self.gate_up]
        parts.append(("down", self.down))
        return ";".join(f"{k}={v.describe()}" for k, v in parts)

    def specs(self) -> set[StorageSpec]:
        return {self.gate_up, self.down, self.gate, self.up}

    @property
    def splits_gate_up(self) -> bool:
        """Whether gate and up are stored apart from `gate_up` (a fused `gate_up_proj` is then
        split into its gate and up parts, each its own blob: `profiles.models.gate_up`)."""
        return self.gate != self.gate_up or self.up != self.gate_up


def spec_of_tensor(spec, name: str) -> StorageSpec:
    """The StorageSpec for tensor `name` under `spec` (a StorageSpec or an ExpertSpecs)."""
    return spec.for_tensor(name) if isinstance(spec, ExpertSpecs) else spec


@dataclass(frozen=True)
class Policy:
    """Per-expert storage: `experts[(layer, expert)]`, else `layers[layer]`, else `default`;
    per matrix, `matrices[(layer, expert, kind)]` (layer and expert None at the default level,
    expert None at a layer's) is searched before each level's spec."""

    schema_version: int = SCHEMA_VERSION
    fingerprint: str | None = None
    default: StorageSpec = field(default_factory=StorageSpec)
    layers: Mapping[int, StorageSpec] = field(default_factory=dict)
    experts: Mapping[tuple[int, int], StorageSpec] = field(default_factory=dict)
    matrices: Mapping[tuple[int | None, int | None, str], StorageSpec] = field(
        default_factory=dict)

    def __post_init__(self) -> None:
        from profiles.matrices import check_kind

        for lay, e, kind in self.matrices:
            where = "policy default" if lay is None else (
                f"policy layer {lay}" if e is None else f"policy expert {lay}:{e}")
            check_kind(kind, where)

    def spec_for(self, layer: int, expert: int, matrix: str | None = None) -> StorageSpec:
        """The spec of an expert (matrix None: the levels' own specs, matrix entries ignored)
        or of one of its matrices."""
        if matrix is None or not self.matrices:
            spec = self.experts.get((layer, expert))
            return spec if spec is not None else self.layers.get(layer, self.default)
        from profiles.matrices import lookup_order

        names = lookup_order(matrix)
        for key, base in (((layer, expert), self.experts.get((layer, expert))),
                          ((layer, None), self.layers.get(layer)),
                          ((None, None), self.default)):
            for m in names:
                spec = self.matrices.get((*key, m))
                if spec is not None:
                    return spec
            if base is not None:
                return base
        return self.default

    def expert_specs(self, layer: int, expert: int) -> ExpertSpecs:
        """The spec of each matrix of one expert."""
        from profiles.matrices import KINDS

        return ExpertSpecs(*(self.spec_for(layer, expert, k) for k in KINDS))

    @property
    def per_matrix(self) -> bool:
        """Whether any matrix is stored differently from its expert."""
        return bool(self.matrices)

    def all_specs(self) -> set[StorageSpec]:
        """Every StorageSpec the policy names, matrix entries included."""
        return {self.default, *self.layers.values(), *self.experts.values(),
                *self.matrices.values()}

    def matrix_table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        """(columns, rows): the spec of each matrix at the default, at each layer and at each
        expert the policy names (experts and layers it does not name take the row above them).
        Columns are `where` and the matrix kinds: `gate_up`, `down`, plus `gate` and `up` when
        the policy names either (the other then shows what it falls back to)."""
        named = {k for _, _, k in self.matrices}
        kinds = ("gate_up", "down") + (("gate", "up") if named & {"gate", "up"} else ())
        layers = sorted(set(self.layers) | {lay for lay, _, _ in self.matrices if lay is not None})
        experts = sorted(set(self.experts) | {(lay, e) for lay, e, _ in self.matrices
                                              if e is not None})
        rows = [("default", *(self.level_spec(None, None, k).describe() for k in kinds))]
        rows += [(f"layer {lay}", *(self.level_spec(lay, None, k).describe() for k in kinds))
                 for lay in layers]
        rows += [(f"expert {lay}:{e}", *(self.spec_for(lay, e, k).describe() for k in kinds))
                 for lay, e in experts]
        return ("where", *kinds), rows

    def level_spec(self, layer: int | None, expert: int | None, kind: str) -> StorageSpec:
        """A matrix's spec for a layer's experts that have no expert-level entry (layer None:
        at the default level; `expert` is not used)."""
        if layer is None:
            from profiles.matrices import lookup_order

            for m in lookup_order(kind):
                if (None, None, m) in self.matrices:
                    return self.matrices[(None, None, m)]
            return self.default
        return self.spec_for(layer, -1, kind)

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
                      dict(self.experts), dict(self.matrices))

    def check(self, moe_layers, experts_per_layer: int, fingerprint: str | None,
              where: str = "policy", tensor_names=None, architecture: str | None = None) -> None:
        """Raise PolicyError unless this policy fits a model with these layers and fingerprint
        (and, given the names of one expert's tensors, matrices the model has: `gate` and `up`
        of a fused `gate_up_proj` where the architecture's layout is known)."""
        from profiles.models.fingerprint import fingerprint_mismatch

        reason = fingerprint_mismatch(self.fingerprint, fingerprint, where)
        if reason:
            raise PolicyError(f"{reason}; make a policy for this model")
        moe = set(moe_layers)
        named = list(self.layers) + [lay for lay, _ in self.experts]
        named += [lay for lay, _, _ in self.matrices if lay is not None]
        for layer in named:
            if layer not in moe:
                raise PolicyError(f"{where} names layer {layer}, which is not an MoE layer of this "
                                  f"model (MoE layers: {_ranges(moe)})")
        pairs = list(self.experts) + [(lay, e) for lay, e, _ in self.matrices if e is not None]
        for layer, expert in pairs:
            if not 0 <= expert < experts_per_layer:
                raise PolicyError(f"{where} names expert {expert} of layer {layer}; this model "
                                  f"has experts 0-{experts_per_layer - 1}")
        if tensor_names is not None and self.matrices:
            from profiles.matrices import model_kinds

            have = model_kinds(tensor_names)
            for kind in sorted({k for _, _, k in self.matrices} - set(have)):
                if kind in ("gate", "up") and "gate_up" in have:
                    from profiles.models.gate_up import require_layout

                    require_layout(architecture, where)   # split out of gate_up_proj
                    continue
                raise PolicyError(f"{where} names matrix {kind!r}, which this model's experts "
                                  f"do not have; its matrices: {', '.join(have)}")

    def to_dict(self) -> dict:
        def level(base: StorageSpec | None, key) -> dict:
            out = base.to_dict() if base is not None else {}
            mats = {m: v.to_dict() for (lay, e, m), v in sorted(
                self.matrices.items(), key=lambda kv: str(kv[0])) if (lay, e) == key}
            if mats:
                out["matrices"] = mats
            return out

        layer_keys = sorted(set(self.layers) | {lay for lay, e, _ in self.matrices
                                                if lay is not None and e is None})
        expert_keys = sorted(set(self.experts) | {(lay, e) for lay, e, _ in self.matrices
                                                  if e is not None})
        return {"kind": KIND, "schema_version": SCHEMA_VERSION,
                "fingerprint": self.fingerprint,
                "default": level(self.default, (None, None)),
                "layers": {str(k): level(self.layers.get(k), (k, None)) for k in layer_keys},
                "experts": {f"{lay}:{e}": level(self.experts.get((lay, e)), (lay, e))
                            for lay, e in expert_keys}}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "policy") -> "Policy":
        if not isinstance(d, Mapping):
            raise PolicyError(f"{where}: expected a JSON object")
        if d.get("kind", KIND) != KIND:
            raise PolicyError(f"{where}: field 'kind' is {d.get('kind')!r}, expected {KIND!r}")
        version = d.get("schema_version")
        if version not in READ_VERSIONS:
            raise PolicyError(f"{where}: schema_version is {version!r}, expected "
                              f"{' or '.join(map(str, READ_VERSIONS))}; regenerate it with this "
                              f"version of moesz")
        matrices: dict[tuple[int | None, int | None, str], StorageSpec] = {}

        def level(v, key, label: str, needs_base: bool = False) -> StorageSpec | None:
            from profiles.matrices import check_kind

            if not isinstance(v, Mapping):
                raise PolicyError(f"{label}: expected an object with 'codec' (and 'mode', "
                                  f"'level')")
            v = dict(v)
            mats = v.pop("matrices", None)
            if mats is not None:
                if version == 1:
                    raise PolicyError(f"{label}: 'matrices' needs schema_version 2; set "
                                      f"\"schema_version\": 2")
                if not isinstance(mats, Mapping) or not mats:
                    raise PolicyError(f"{label}: 'matrices' must map matrix names to storage "
                                      f"specs, e.g. {{\"down\": {{\"codec\": \"rtn8\"}}}}")
                for m, spec in mats.items():
                    check_kind(str(m), label)
                    matrices[(*key, str(m))] = StorageSpec.from_dict(
                        spec, f"{label} matrix {m}")
            if not v and mats is not None and not needs_base:
                return None   # only matrix entries at this level
            return StorageSpec.from_dict(v, label)

        try:
            layers = {}
            for k, v in (d.get("layers") or {}).items():
                spec = level(v, (int(k), None), f"{where} layer {k}")
                if spec is not None:
                    layers[int(k)] = spec
            experts = {}
            for k, v in (d.get("experts") or {}).items():
                lay, _, e = str(k).partition(":")
                spec = level(v, (int(lay), int(e)), f"{where} expert {k}")
                if spec is not None:
                    experts[(int(lay), int(e))] = spec
        except ValueError:
            raise PolicyError(f"{where}: layer keys must be integers and expert keys "
                              f"'LAYER:EXPERT', e.g. '3' and '3:5'") from None
        default = d.get("default") or {"codec": "raw"}
        if isinstance(default, Mapping) and "codec" not in default:
            default = {"codec": "raw", **default}
        default = level(default, (None, None), f"{where} default", needs_base=True)
        return cls(SCHEMA_VERSION, d.get("fingerprint"), default, layers, experts, matrices)

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
    policy.check(emap.moe_layers, emap.experts_per_layer, loaded.fingerprint,
                 tensor_names=[n for n, _ in geometry.expert_tensor_shapes],
                 architecture=geometry.architecture)
    if getattr(loaded, "offload", None) is not None:
        with _offloaded_policy(loaded, policy, surrogate, progress) as report:
            yield report
        return
    restorer, rows, raw_sizes = WeightRestorer(), [], {}
    try:
        for i, ref in enumerate(emap.experts):
            specs = policy.expert_specs(ref.layer, ref.expert)
            stored, bounds = 0, []
            for name, t in _pieces(ref.tensors, specs, geometry.architecture):
                spec = specs.for_tensor(name)
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
            rows.append(ExpertStorage(ref.layer, ref.expert, specs.describe(),
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
            spec = policy.expert_specs(layer, e)
            if spec.uniform is not None and spec.uniform.codec == "raw":
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


def _pieces(tensors: dict[str, torch.Tensor], specs: ExpertSpecs, architecture: str
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) of each tensor an expert is stored as: its own tensors, with a fused
    `gate_up_proj` (and its bias) as its gate and up parts when the specs store them apart.
    Each is a view of the model's weights, so writing its decoded values edits the model."""
    from profiles.models.gate_up import PARTS, require_layout

    if not (specs.splits_gate_up and any(n in PARTS for n in tensors)):
        yield from tensors.items()
        return
    layout = require_layout(architecture)
    for name, t in tensors.items():
        if name in PARTS:
            yield from zip(PARTS[name], layout.split(name, t))
        else:
            yield name, t


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
