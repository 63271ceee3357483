"""The per-layer choice table: for each MoE layer and storage choice, what it costs and risks.

A choice is a `StorageSpec` (`raw`, or a codec at a profiled level). For every (layer, choice) the
table holds the accuracy model's mean drop and variance, the stored bytes of one expert (from the
profile's measured ratios), the decode speed (from the hardware profile), and the expected
seconds per decode step of that layer's expert phase under the serving configuration, from the
closed-form cost model (`sim.closed_form`). When the closed form is separable over layers (cached
experts decompressed or a per-layer cache, and no host budget), step time = fixed + sum of the
layer times exactly; otherwise the table holds the marginal step time of each choice around a
reference assignment (a linearization, refreshed by the caller) and says so.

Per matrix (`plan --per-matrix`), a choice is a spec per planned matrix kind (`MatrixChoice`):
`gate_up` and `down`, or `gate`, `up` and `down` when the profile perturbed gate and up apart
(`AccuracyModel.matrix_kinds`), every combination of the profiled levels and raw, so the search
and the MILP pick a level per (layer, matrix) through the same one-choice-per-layer machinery; a
choice's bytes and decode time are its matrices' (`sim.costs`), its drop the sum of the
single-matrix drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from planner.accuracy import AccuracyModel
from profiles.errors import ConfigError, MoeszError
from profiles.policy import Policy, StorageSpec


@dataclass(frozen=True, init=False)
class MatrixChoice:
    """A per-matrix choice: a spec per matrix kind, not all equal. `MatrixChoice(A, B)` stores
    gate_up as A and down as B; `MatrixChoice(A, B, C, kinds=("gate", "up", "down"))` gate, up
    and down. `codec` is "per-matrix" so the uniform baselines, which look for one codec's
    levels, pass it by."""

    kinds: tuple[str, ...]
    specs: tuple[StorageSpec, ...]
    codec = "per-matrix"
    mode = None
    level = None

    def __init__(self, *specs: StorageSpec, kinds: Sequence[str] = ("gate_up", "down")) -> None:
        if len(specs) != len(kinds):
            raise ValueError(f"MatrixChoice: {len(specs)} specs for matrices {kinds}")
        object.__setattr__(self, "kinds", tuple(kinds))
        object.__setattr__(self, "specs", tuple(specs))

    def __getattr__(self, kind: str) -> StorageSpec:   # choice.gate_up, choice.down, ...
        kinds = self.__dict__.get("kinds", ())
        if kind in kinds:
            return self.specs[kinds.index(kind)]
        raise AttributeError(kind)

    def describe(self) -> str:
        return ";".join(f"{k}={s.describe()}" for k, s in zip(self.kinds, self.specs))

    def layer_policy(self, layer: int) -> tuple[dict, dict]:
        """(layers, matrices) entries of a Policy storing `layer` this way: the first kind's spec
        for the layer, a matrix entry for each other kind whose spec differs from it."""
        base = self.specs[0]
        return {layer: base}, {(layer, None, k): s for k, s in zip(self.kinds[1:], self.specs[1:])
                               if s != base}


@dataclass(frozen=True)
class ChoiceTable:
    """Arrays indexed [layer position, choice]; unavailable entries are NaN.

    Attributes:
        moe_layers: the MoE layer indices (positions in the arrays).
        specs: the choices (index 0 is always raw).
        mu, var: mean drop and its variance of each choice at each layer (accuracy model).
        stored_bytes: stored bytes of one expert.
        decode_gbps: decode speed in GB/s of bf16 bytes (0 = no decoding).
        cpu_decode: True where the choice decodes on the host CPU.
        layer_s: seconds per decode step of the layer's expert phase (closed form).
        separable: layer_s adds up to the closed form exactly.
        notes: what the table assumed.
    """

    moe_layers: tuple[int, ...]
    specs: tuple[StorageSpec, ...]
    mu: np.ndarray
    var: np.ndarray
    stored_bytes: np.ndarray
    decode_gbps: np.ndarray
    cpu_decode: np.ndarray
    layer_s: np.ndarray
    experts_per_layer: int
    separable: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def labels(self) -> list[str]:
        return [s.describe() for s in self.specs]

    @property
    def available(self) -> np.ndarray:
        return np.isfinite(self.mu) & np.isfinite(self.layer_s)

    def options(self, pos: int) -> list[int]:
        """Indices of the choices available at layer position `pos`, ordered as the table."""
        return [int(c) for c in np.flatnonzero(self.available[pos])]

    def policy(self, choice: Sequence[int], fingerprint: str | None = None) -> Policy:
        """The `Policy` of an assignment (raw layers are left to the raw default)."""
        return _policy({layer: self.specs[c] for layer, c in zip(self.moe_layers, choice)
                        if c != 0}, fingerprint)

    def inputs(self, choices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closed-form inputs (bytes, GB/s, cpu flags) `[n, L]` of assignments `[n, L]`."""
        choices = np.atleast_2d(choices)
        rows = np.arange(len(self.moe_layers))[None, :]
        return (self.stored_bytes[rows, choices], self.decode_gbps[rows, choices],
                self.cpu_decode[rows, choices])

    def sums(self, choice: Sequence[int]) -> tuple[float, float]:
        """(sum of means, sum of variances) of an assignment."""
        rows = np.arange(len(self.moe_layers))
        ch = np.asarray(choice)
        return float(self.mu[rows, ch].sum()), float(self.var[rows, ch].sum())

    def host_bytes(self, choice: Sequence[int]) -> int:
        """Host memory of all routed experts (every layer) when stored this way."""
        b, _, _ = self.inputs(np.asarray(choice))
        return int(b.sum() * self.experts_per_layer)


def default_codecs(accuracy: AccuracyModel, hardware: Any, serving: Any, host_binds: bool
                   ) -> list[str]:
    """Codecs that cut transfer for this configuration, among those the profile has single-layer
    rows for: every GPU-decodable one (`szp`, `cuszp`, `ans`, and the formats users run: `gq`,
    `nf4`, `mxfp4`, GGUF types) whose GPU decode speed the hardware profile measured or
    `sim.costs.estimated_gpu_rate` can estimate (labelled so), and CPU codecs (`sz3`) only when
    the host budget binds. `lossless`, `rtn8` and `rtn4` are baselines, not searched unless
    named."""
    from profiles.codecs import get_codec
    from sim.costs import estimated_gpu_rate

    profiled = sorted({lab.split(":")[0].split(",")[0] for (_, lab) in accuracy.effects})
    out = []
    for name in profiled:
        try:
            codec = get_codec(name)
        except MoeszError:
            continue
        if name in ("lossless", "rtn8", "rtn4"):
            continue  # baselines, compared with rather than searched (give --codecs to search)
        if codec.gpu_decodable and not codec.cpu_only:
            if name in hardware.gpu.decode or estimated_gpu_rate(hardware, name) is not None:
                out.append(name)
        elif codec.cpu_only and host_binds and name in hardware.host.codecs:
            out.append(name)
    return out


def _policy(per_layer: dict, fingerprint: str | None = None) -> Policy:
    """A Policy from {layer: StorageSpec or MatrixChoice}; other layers raw."""
    layers, matrices = {}, {}
    for layer, spec in per_layer.items():
        if isinstance(spec, MatrixChoice):
            lay, mat = spec.layer_policy(layer)
            layers.update(lay)
            matrices.update(mat)
        else:
            layers[layer] = spec
    return Policy(fingerprint=fingerprint, default=StorageSpec("raw"), layers=layers,
                  matrices=matrices)


def build_table(*, accuracy: AccuracyModel, geometry: Any, ratios: Any, hardware: Any,
                serving: Any, closed_form: Any, codecs: Sequence[str],
                reference: np.ndarray | None = None, per_matrix: bool = False) -> ChoiceTable:
    """The choice table for the given codecs (every profiled level of each), plus raw.

    Args:
        accuracy: the accuracy model (which choices were profiled at which layers).
        geometry, ratios, hardware, serving: as for `sim.costs.build_costs`.
        closed_form: a `sim.closed_form.ClosedFormModel` for this configuration.
        codecs: codec names to consider.
        reference: for a non-separable closed form, the assignment to linearize around
            (default: all raw).
        per_matrix: also every combination of specs, not all equal, for the planned matrix
            kinds (`MatrixChoice`; `accuracy.matrix_kinds`); needs `accuracy.attach_matrices`.

    Raises:
        ConfigError: a requested codec has no profiled single-layer rows.
    """
    from sim.costs import build_costs

    moe = tuple(geometry.moe_layers)
    L = len(moe)
    labels = sorted({lab for (_, lab) in accuracy.effects
                     if lab.split(":")[0].split(",")[0] in codecs},
                    key=lambda s: (s.split(":")[0], _level_of(s)))
    missing = [c for c in codecs if not any(lab.split(":")[0].split(",")[0] == c for lab in labels)]
    if missing:
        have = sorted({lab.split(":")[0] for (_, lab) in accuracy.effects})
        raise ConfigError(f"--codecs: the profile has no single-layer sensitivity rows for "
                          f"{', '.join(missing)}; profiled codecs: {', '.join(have) or 'none'}")
    specs = [StorageSpec("raw")] + [StorageSpec.parse(lab) for lab in labels]
    if per_matrix:
        import itertools

        kinds = accuracy.matrix_kinds or ("gate_up", "down")
        specs += [MatrixChoice(*combo, kinds=kinds)
                  for combo in itertools.product(specs, repeat=len(kinds))
                  if len(set(combo)) > 1]
    C = len(specs)
    mu = np.full((L, C), np.nan)
    var = np.full((L, C), np.nan)
    orig = float(geometry.bytes_per_expert)
    b = np.full((L, C), orig)
    gb = np.zeros((L, C))
    cpu = np.zeros((L, C), bool)
    mu[:, 0] = var[:, 0] = 0.0
    if getattr(geometry, "dtype", None) == "mxfp4":
        # raw = the experts as shipped (gpt-oss MXFP4): they are dequantized on the GPU
        bb, gg, cc = closed_form.inputs_from_costs(build_costs(
            geometry, Policy(default=StorageSpec("raw")), hardware, serving, ratios))
        b[:, 0], gb[:, 0], cpu[:, 0] = bb, gg, cc
    notes = []
    for c, spec in enumerate(specs[1:], start=1):
        label = spec.describe()
        ok_layers = {}
        for pos, layer in enumerate(moe):
            eff = accuracy.effect(layer, label)
            if eff is None:
                continue
            try:
                for s in (spec.specs if isinstance(spec, MatrixChoice) else (spec,)):
                    ratios.ratio(layer, s, geometry)
            except MoeszError:
                continue
            ok_layers[layer] = spec
            mu[pos, c], var[pos, c] = eff[0], eff[1] ** 2
        if not ok_layers:
            notes.append(f"{label}: no layer has both a sensitivity row and a ratio; skipped")
            continue
        costs = build_costs(geometry, _policy(ok_layers), hardware, serving, ratios)
        bb, gg, cc = closed_form.inputs_from_costs(costs)
        for pos, layer in enumerate(moe):
            if layer in ok_layers:
                b[pos, c], gb[pos, c], cpu[pos, c] = bb[pos], gg[pos], cc[pos]
            else:
                mu[pos, c] = var[pos, c] = np.nan
    separable = ((serving.resident_form == "decompressed" or serving.per_layer_cache_slots
                  is not None) and closed_form.host_budget is None)
    layer_s = _layer_times(closed_form, b, gb, cpu, separable, reference)
    layer_s[~np.isfinite(mu)] = np.nan
    if not separable:
        notes.append("the closed form is not separable over layers here (compressed residency or "
                      "a host budget): the MILP optimizes a linearization around a reference "
                      "policy, refreshed until it settles; plans are scored with the full closed "
                      "form")
    return ChoiceTable(moe, tuple(specs), mu, var, b, gb, cpu, layer_s, geometry.experts_per_layer,
                       separable, tuple(notes + list(accuracy.notes)))


def _layer_times(cf, b, gb, cpu, separable: bool, reference: np.ndarray | None) -> np.ndarray:
    L, C = b.shape
    if separable:
        # row c: every layer takes choice c; column l of the result is layer l's time with c
        t = cf.layer_s_many(b.T, gb.T, cpu.T)  # [C, L]
        return np.asarray(t, dtype=float).T.copy()
    ref = np.zeros(L, dtype=int) if reference is None else np.asarray(reference, dtype=int)
    rows = np.arange(L)
    base_b, base_g, base_c = b[rows, ref], gb[rows, ref], cpu[rows, ref]
    B = np.repeat(base_b[None, :], L * C, axis=0)
    G = np.repeat(base_g[None, :], L * C, axis=0)
    K = np.repeat(base_c[None, :], L * C, axis=0)
    for pos in range(L):
        sl = slice(pos * C, (pos + 1) * C)
        B[sl, pos], G[sl, pos], K[sl, pos] = b[pos], gb[pos], cpu[pos]
    step = cf.step_s_many(B, G, K).reshape(L, C)
    base = float(cf.step_s_many(base_b[None, :], base_g[None, :], base_c[None, :])[0])
    return step - base  # marginal seconds per step of each choice, others at the reference


def _level_of(label: str) -> float:
    parts = label.split(",")[0].split(":")
    try:
        return float(parts[2]) if len(parts) == 3 else -1.0
    except ValueError:
        return -1.0
