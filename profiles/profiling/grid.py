"""The points of a sensitivity sweep: targets (layers, groups, the whole model) x experts x codec x level.

A `Point` is one perturbation of the model evaluated against the unperturbed baseline: a target
(one MoE layer, a group of layers, or every MoE layer), which experts of each targeted layer
(`all`, the `top:N` most activated from the routing traces, or `expert:E`), and how they are
stored (a codec with mode and level, or a noise surrogate at the same bound).

Two designs:

- `grid` (default): every chosen layer and group, and (when all layers are chosen) the whole
  model, x codec x level; plus the baselines `lossless`, `rtn8` and `rtn4` on all experts of the
  model, and any formats users run named as `baselines` (`nf4`, `q4_k`, …: the whole model only,
  one point each, for the planner's `best user format` row without the cost of their
  single-layer points).
- `paper`: the MoE-compression study's design (Ma et al., SC'25 workshops, arXiv 2509.07727) scaled
  to this model's MoE layers: the top expert of four layers spread like the study's 1, 13, 20, 26
  of 26; expert 0 of the first layer; the top-6 experts of the first and the last layer; all experts
  of each of the four layers; and three overlapping groups of about 10/26 of the layers (G1, G2, G3,
  the top expert of each layer) — Gaussian noise at meanabs p in {0.1, 0.3, 0.5, 0.8}, each next to
  the same target with a real codec round trip at the matching bound.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from profiles.errors import ConfigError

BASELINE_CODECS = ("lossless", "rtn8", "rtn4")
MATRIX_KINDS = ("gate_up", "down")   # the kinds per-matrix points perturb unless told otherwise
PAPER_LEVELS = (0.1, 0.3, 0.5, 0.8)
_TARGET_RE = re.compile(r"^(all|top:(\d+)|expert:(\d+))$")


@dataclass(frozen=True)
class Point:
    """One evaluated perturbation; `key` identifies it in the sweep storage and the tables."""

    target: str                 # "layer:3", "group:shallow", "group:G1", "all"
    target_kind: str            # "layer", "group", "model"
    layers: tuple[int, ...]     # MoE layers perturbed
    experts: str                # "all", "top:N", "expert:E"
    codec: str                  # codec name, or "noise" for a surrogate
    mode: str                   # bound mode, "none" for codecs without a bound
    level: float | None
    surrogate: str = "none"     # "none", "gaussian", "uniform"
    codec_options: tuple[tuple[str, object], ...] = ()
    spec_codec: str = ""        # the codec whose bound a surrogate matches (measures bytes)
    matrix: str = "all"         # "all", or the one matrix kind perturbed (gate_up, down, gate, up)

    @property
    def key(self) -> str:
        level = "nan" if self.level is None else f"{self.level:g}"
        opts = json.dumps(dict(self.codec_options), sort_keys=True)
        # whole-expert points keep the keys they had before per-matrix points existed
        tail = "" if self.matrix == "all" else f"|matrix={self.matrix}"
        return (f"{self.target}|{self.experts}|{self.codec}|{self.mode}|{level}|{self.surrogate}"
                f"|{opts}{tail}")

    def describe(self) -> str:
        bound = "" if self.level is None else f":{self.mode}:{self.level:g}"
        noise = f" ({self.surrogate} noise)" if self.surrogate != "none" else ""
        only = "" if self.matrix == "all" else f" ({self.matrix} only)"
        return f"{self.target} {self.experts} {self.codec}{bound}{noise}{only}"


@dataclass(frozen=True)
class GridSpec:
    """What to sweep, as given on the command line (parsed and checked)."""

    codecs: tuple[str, ...] = ("szp", "sz3")
    mode: str = "meanabs"
    levels: tuple[float, ...] = (0.1, 0.3, 1.0, 2.0, 3.0)
    layers: tuple[int, ...] | None = None          # None: every MoE layer
    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    experts: str = "all"                            # all | top:N | expert:E
    design: str = "grid"                            # grid | paper
    codec_options: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    baselines: tuple[str, ...] = ()                # formats measured on the whole model only
    per_matrix: bool = False                        # also perturb one matrix kind at a time
    matrices: tuple[str, ...] = MATRIX_KINDS        # ... these kinds (profiles.matrices.KINDS)


def parse_levels(text: str | Sequence[float]) -> tuple[float, ...]:
    """`0.1,0.3,1` -> (0.1, 0.3, 1.0); each level must be a positive finite number."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            v = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"level {item!r} is not a number; give levels like 0.1,0.3,1,2,3"
                              ) from None
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"level {item!r} must be a positive number, e.g. 0.1,0.3,1,2,3")
        out.append(v)
    if not out:
        raise ConfigError("no levels given; give levels like 0.1,0.3,1,2,3")
    return tuple(sorted(set(out)))


def parse_matrices(text: str | Sequence[str]) -> tuple[str, ...]:
    """`gate,up,down` -> ("gate", "up", "down"): the matrix kinds `--per-matrix` perturbs one at
    a time, in that order; each must be one of `profiles.matrices.KINDS`."""
    from profiles.matrices import KINDS

    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text)]
    out = tuple(dict.fromkeys(m for m in items if m))
    for m in out:
        if m not in KINDS:
            raise ConfigError(f"--matrices: unknown matrix {m!r}; valid matrices: "
                              f"{', '.join(KINDS)} (e.g. --matrices gate,up,down)")
    if not out:
        raise ConfigError(f"--matrices: no matrix given; name some of {', '.join(KINDS)}")
    return out


def parse_layers(text: str, moe_layers: Sequence[int]) -> tuple[int, ...] | None:
    """`all` -> None; `0,3,7` or `0-3,7` -> those MoE layers (checked against the model)."""
    if text.strip() == "all":
        return None
    layers = _ranges(text, "--layers")
    bad = [x for x in layers if x not in moe_layers]
    if bad:
        raise ConfigError(f"--layers names layer {bad[0]}, which is not an MoE layer of this model; "
                          f"MoE layers: {_fmt(moe_layers)}")
    return layers


def parse_groups(text: str, moe_layers: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """`none`, `thirds` (shallow / middle / deep thirds of the MoE layers) and/or `NAME=0-3,…`.

    Items are separated by `;` or by a comma followed by a new `NAME=`, e.g.
    `thirds;G1=0-3;G2=2-5` or `G1=0-3,G2=4-7`.
    """
    text = text.strip()
    if text in ("", "none"):
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for item in re.split(r";|,(?=\s*[A-Za-z_][\w-]*\s*=)", text):
        item = item.strip()
        if not item:
            continue
        if item == "thirds":
            out.update(thirds(moe_layers))
            continue
        name, sep, spec = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*", name.strip()):
            raise ConfigError(f"--groups item {item!r} is not thirds or NAME=LAYERS "
                              f"(e.g. G1=0-3,G2=4-7)")
        layers = _ranges(spec, f"--groups {name.strip()}")
        bad = [x for x in layers if x not in moe_layers]
        if bad:
            raise ConfigError(f"--groups {name.strip()} names layer {bad[0]}, which is not an MoE "
                              f"layer of this model; MoE layers: {_fmt(moe_layers)}")
        out[name.strip()] = layers
    return out


def thirds(moe_layers: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Shallow, middle and deep thirds of the MoE layers (the first third gets the remainder last)."""
    layers = list(moe_layers)
    n = len(layers)
    a, b = round(n / 3), round(2 * n / 3)
    return {"shallow": tuple(layers[:a]), "middle": tuple(layers[a:b]), "deep": tuple(layers[b:])}


def parse_experts(text: str, experts_per_layer: int) -> str:
    """`all`, `top:N` (1 <= N <= experts per layer) or `expert:E` (0 <= E < experts per layer)."""
    m = _TARGET_RE.match(text.strip())
    if not m:
        raise ConfigError(f"--target {text!r} is not all, top:N or expert:E")
    if m.group(2) is not None and not 1 <= int(m.group(2)) <= experts_per_layer:
        raise ConfigError(f"--target {text}: N must be 1-{experts_per_layer}, the experts per layer")
    if m.group(3) is not None and not 0 <= int(m.group(3)) < experts_per_layer:
        raise ConfigError(f"--target {text}: this model has experts 0-{experts_per_layer - 1}")
    return text.strip()


def build_points(spec: GridSpec, moe_layers: Sequence[int], experts_per_layer: int) -> list[Point]:
    """Every point of the sweep, in the order they should run."""
    if spec.design == "paper":
        if spec.per_matrix:
            raise ConfigError("--per-matrix works with --design grid only; drop one of them")
        return paper_points(spec, moe_layers, experts_per_layer)
    if spec.design != "grid":
        raise ConfigError(f"--design {spec.design!r} is unknown; choose grid or paper")
    layers = tuple(spec.layers) if spec.layers is not None else tuple(moe_layers)
    targets = [(f"layer:{x}", "layer", (x,)) for x in layers]
    targets += [(f"group:{name}", "group", g) for name, g in spec.groups.items() if g]
    if spec.layers is None:   # the whole model at each level: the uniform policies
        targets.append(("all", "model", tuple(moe_layers)))
    points = []
    chosen = [c for c in spec.codecs if c not in BASELINE_CODECS]
    bounded = [c for c in chosen if _error_bounded(c)]
    for level in spec.levels:
        for codec in bounded:
            for target, kind, lays in targets:
                points.append(Point(target, kind, lays, spec.experts, codec, spec.mode, level,
                                    codec_options=_opts(spec, codec)))
    if spec.per_matrix:
        # each profiled layer and group, each level: one matrix kind at a time perturbed
        for level in spec.levels:
            for codec in bounded:
                for target, kind, lays in targets:
                    if kind == "model":
                        continue
                    for matrix in spec.matrices:
                        points.append(Point(target, kind, lays, spec.experts, codec, spec.mode,
                                            level, codec_options=_opts(spec, codec),
                                            matrix=matrix))
    # formats without a bound (gq, nf4, mxfp4, GGUF types): one point per target, no level
    for codec in (c for c in chosen if not _error_bounded(c)):
        for target, kind, lays in targets:
            points.append(Point(target, kind, lays, spec.experts, codec, "none", None,
                                codec_options=_opts(spec, codec)))
    for codec in BASELINE_CODECS + tuple(c for c in spec.baselines if c not in chosen):
        points.append(Point("all", "model", tuple(moe_layers), "all", codec, "none", None,
                            codec_options=_opts(spec, codec)))
    return points


def _error_bounded(codec: str) -> bool:
    from profiles.codecs import get_codec

    return codec == "noise" or get_codec(codec).error_bounded


def paper_layers(moe_layers: Sequence[int]) -> tuple[int, ...]:
    """Four MoE layers placed like the study's layers 1, 13, 20 and 26 of 26."""
    layers = list(moe_layers)
    n = len(layers)
    picks = sorted({layers[min(n - 1, round(f * (n - 1)))] for f in (0.0, 12 / 25, 19 / 25, 1.0)})
    return tuple(picks)


def paper_groups(moe_layers: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Three overlapping groups of about 10/26 of the MoE layers, like the study's G1-G3."""
    layers = list(moe_layers)
    n = len(layers)
    size = max(2, min(n, round(10 * n / 26)))
    starts = (0, round((n - size) / 2), n - size)
    return {f"G{i + 1}": tuple(layers[s:s + size]) for i, s in enumerate(starts)}


def paper_points(spec: GridSpec, moe_layers: Sequence[int], experts_per_layer: int) -> list[Point]:
    chosen = tuple(spec.layers) if spec.layers is not None else paper_layers(moe_layers)
    first, last = chosen[0], chosen[-1]
    top6 = f"top:{min(6, experts_per_layer)}"
    targets = [(f"layer:{x}", "layer", (x,), "top:1") for x in chosen]
    targets.append((f"layer:{first}", "layer", (first,), "expert:0"))
    targets += [(f"layer:{x}", "layer", (x,), top6) for x in sorted({first, last})]
    targets += [(f"layer:{x}", "layer", (x,), "all") for x in chosen]
    groups = dict(spec.groups) or paper_groups(moe_layers)
    targets += [(f"group:{name}", "group", g, "top:1") for name, g in groups.items()]
    real = next((c for c in spec.codecs if c not in BASELINE_CODECS), "szp")
    levels = PAPER_LEVELS
    points = []
    for level in levels:
        for target, kind, lays, experts in targets:
            points.append(Point(target, kind, lays, experts, "noise", "meanabs", level, "gaussian",
                                spec_codec=real))
            points.append(Point(target, kind, lays, experts, real, "meanabs", level,
                                codec_options=_opts(spec, real)))
    return points


def _opts(spec: GridSpec, codec: str) -> tuple[tuple[str, object], ...]:
    return tuple(sorted(dict(spec.codec_options.get(codec, {})).items()))


def _ranges(text: str, what: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"{what}: {part!r} is not a layer index or range like 0-3")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"{what}: range {part!r} runs backwards; write it as {hi}-{lo}")
        out.extend(range(lo, hi + 1))
    return tuple(sorted(set(out)))


def _fmt(layers: Sequence[int]) -> str:
    from profiles.models.expert_map import format_ranges

    return format_ranges(layers)
