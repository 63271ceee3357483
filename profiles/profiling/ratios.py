"""Compression ratios of each MoE layer's real expert weights, per codec, mode and level.

For every MoE layer x codec x level, the layer's experts (all of them, or a seeded sample with the
spread over the sample reported) go through a real encode -> decode round trip. The ratio counts
every stored byte (blob header included) against the expert's bytes in the CHECKPOINT dtype
(`geometry.bytes_per_expert`: bf16 counts 2 bytes a value, FP8 one, gpt-oss's MXFP4 its blocks,
scales and biases as shipped), with the ratio against bf16 beside (`ratio_vs_bf16`), and the decoded tensor is
checked against the bound actually applied (`max_err_over_bound`, which may exceed 1 only by the
rounding of the decoded value back to the checkpoint dtype, at most half an ulp). The baselines
`lossless`, `rtn8` and `rtn4` are always measured, so the planner can compare against them.
"""

from __future__ import annotations

import json
import math
import random
from typing import Callable, Sequence

import torch

from profiles.profiling.grid import BASELINE_CODECS

RATIO_COLUMNS = ("layer", "codec", "mode", "level", "codec_options", "abs_bound_mean", "ratio",
                 "ratio_min", "ratio_max", "original_bytes_per_expert",
                 "compressed_bytes_per_expert", "n_experts", "n_experts_total",
                 "max_err_over_bound", "source")
# beside the ratio against the checkpoint's own bytes: against bf16 (2 bytes a value), which
# differs for checkpoints that ship quantized (FP8, gpt-oss MXFP4); absent in older profiles
OPTIONAL_COLUMNS = ("ratio_vs_bf16",)
Progress = Callable[[int, int, str], None]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, piece: int = 1 << 22) -> float:
    """max |a - b| in fp32, a piece of `piece` values at a time (a whole-tensor fp32 difference of
    a 117 M-value Mixtral expert matrix would hold three 470 MB temporaries)."""
    x, y = a.reshape(-1), b.detach().reshape(-1)
    worst = 0.0
    for lo in range(0, x.numel(), piece):
        d = (x[lo: lo + piece].float() - y[lo: lo + piece].float()).abs().max()
        worst = max(worst, float(d))
    return worst


def sample_experts(experts_per_layer: int, sample: int | None, layer: int, seed: int) -> list[int]:
    """All expert indices, or a seeded sample of `sample` of them (sorted), per layer."""
    if sample is None or sample >= experts_per_layer:
        return list(range(experts_per_layer))
    rng = random.Random(f"ratios:{seed}:{layer}")
    return sorted(rng.sample(range(experts_per_layer), sample))


def done_key(layer, codec: str, level, options, matrix: str = "all") -> tuple:
    """What identifies a measured ratio row when a profile resumes: layer, codec, level (None when
    it has none) and the codec options completed with their defaults (so `gq` at 3 bits is not
    taken for `gq` at 4 bits)."""
    from profiles.codecs import get_codec

    if level is not None and isinstance(level, float) and math.isnan(level):
        level = None
    if isinstance(options, str):
        options = json.loads(options) if options.strip() else {}
    elif options is None or (isinstance(options, float) and math.isnan(options)):
        options = {}
    try:
        options = get_codec(codec).check_options(dict(options))
    except Exception:  # noqa: BLE001 - an unknown codec's rows keep their options as written
        options = dict(options)
    return (int(layer), str(codec), None if level is None else float(level),
            json.dumps(options, sort_keys=True, default=str), str(matrix))


def ratio_runs(codecs: Sequence[str], mode: str, levels: Sequence[float],
               codec_options: dict | None = None) -> list[tuple[str, str, float | None, dict]]:
    """(codec, mode, level, options) for every bounded codec x level, then the baselines."""
    from profiles.codecs import get_codec

    codec_options = codec_options or {}
    runs = []
    for name in codecs:
        if name in BASELINE_CODECS:
            continue
        if get_codec(name).error_bounded:
            runs += [(name, mode, lv, dict(codec_options.get(name, {}))) for lv in levels]
        else:
            runs.append((name, "none", None, dict(codec_options.get(name, {}))))
    runs += [(name, "none", None, {}) for name in BASELINE_CODECS]
    return runs


def measure_ratios(model, codecs: Sequence[str], mode: str, levels: Sequence[float], *,
                   sample: int | None = None, seed: int = 0, codec_options: dict | None = None,
                   layers: Sequence[int] | None = None, done_keys: set | None = None,
                   progress: Progress | None = None, per_matrix: bool = False,
                   matrices: Sequence[str] | None = None):
    """Measure ratios on a model's real expert weights.

    Each sampled expert is read once (from the checkpoint's files when `model` is an expert
    source of files: `profiles.models.source`) and goes through every codec and level before the
    next one is read, so memory holds one expert and a codec's buffers.

    Args:
        model: a `profiles.models.LoadedModel` or an expert source.
        codecs: codec names (the baselines are added).
        mode: bound mode of the bounded codecs.
        levels: bound levels.
        sample: experts per layer to measure (None: all), drawn with `seed`.
        codec_options: per-codec options, e.g. {"sz3": {"predictor": "lorenzo"}}.
        layers: MoE layers to measure (default all).
        done_keys: `done_key`s of the rows already measured (skipped, for resuming).
        progress: `progress(done, total, label)` per layer x expert.
        per_matrix: also a row per matrix kind (`matrix` gate_up, down) for every layer x codec
            x level: the matrix's stored bytes against its share of the expert's checkpoint
            bytes (by values), from the same round trips. Whole-expert rows are `matrix` all.
        matrices: the kinds of those rows (default: the model's, gate_up and down); `gate` and
            `up` of a fused `gate_up_proj` are its two parts (`profiles.models.gate_up`), each
            put through its own round trip.

    Returns:
        A pandas DataFrame with `RATIO_COLUMNS`, `ratio_vs_bf16` and `matrix`.
    """
    import pandas as pd

    from profiles.codecs import roundtrip
    from profiles.matrices import matrix_of, matrix_values
    from profiles.models.gate_up import PARTS, require_layout, split_expert
    from profiles.models.source import expert_source

    src = expert_source(model)
    g = src.geometry
    values = matrix_values(g.expert_tensor_shapes)
    total_values = sum(values.values())
    if matrices is None:
        matrices = sorted(values, key=lambda k: k != "gate_up")
    split = per_matrix and "gate_up" in values and bool({"gate", "up"} & set(matrices))
    layout = require_layout(g.architecture, "--matrices") if split else None
    if split:   # gate and up: the halves of gate_up, as stored apart
        values.update(matrix_values(g.expert_tensor_shapes, split=True))
    kinds = ["all"] + ([k for k in matrices if k in values] if per_matrix else [])
    parts = {p for pair in PARTS.values() for p in pair}
    layers = tuple(layers) if layers is not None else tuple(src.moe_layers)
    runs = ratio_runs(codecs, mode, levels, codec_options)
    todo = {layer: [run for run in runs if not done_keys or any(
                done_key(layer, run[0], run[2], run[3], k) not in done_keys for k in kinds)]
            for layer in layers}
    todo = {layer: rs for layer, rs in todo.items() if rs}
    picks = {layer: sample_experts(g.experts_per_layer, sample, layer, seed) for layer in todo}
    total, done = sum(len(p) for p in picks.values()), 0
    rows = []
    for layer, layer_runs in todo.items():
        stored = {i: [] for i in range(len(layer_runs))}
        by_kind = {(i, k): [] for i in range(len(layer_runs)) for k in kinds}
        bounds = {i: [] for i in range(len(layer_runs))}
        worst = {i: 0.0 for i in range(len(layer_runs))}
        for e in picks[layer]:
            if progress:
                progress(done, total, f"ratios layer {layer} expert {e}")
            tensors = src.expert_tensors(layer, e)
            bf16_bytes = 2 * sum(t.numel() for t in tensors.values())
            pieces = {n: t for n, t in split_expert(tensors, layout).items()
                      if n in parts} if split else {}
            for i, (codec, rmode, level, opts) in enumerate(layer_runs):
                nbytes = 0
                per_kind = dict.fromkeys(kinds, 0)
                for name, t in tensors.items():
                    with torch.no_grad():
                        decoded, blob = roundtrip(t, codec, None if rmode == "none" else rmode,
                                                  level, **opts)
                    nbytes += blob.nbytes
                    if per_matrix and matrix_of(name) in per_kind:
                        per_kind[matrix_of(name)] += blob.nbytes
                    if blob.abs_bound:
                        bounds[i].append(blob.abs_bound)
                        worst[i] = max(worst[i], max_abs_diff(decoded, t) / blob.abs_bound)
                    del decoded, blob
                for name, t in pieces.items():   # gate and up parts: their own round trips
                    if matrix_of(name) in per_kind:
                        with torch.no_grad():
                            _, blob = roundtrip(t, codec, None if rmode == "none" else rmode,
                                                level, **opts)
                        per_kind[matrix_of(name)] += blob.nbytes
                stored[i].append(nbytes)
                for k in kinds[1:]:
                    by_kind[(i, k)].append(per_kind[k])
            del tensors, pieces
            done += 1
        for i, (codec, rmode, level, opts) in enumerate(layer_runs):
            per_expert = [g.bytes_per_expert / s for s in stored[i]]
            rows.append({
                "layer": layer, "codec": codec, "mode": rmode,
                "level": math.nan if level is None else float(level),
                "codec_options": json.dumps(opts, sort_keys=True),
                "abs_bound_mean": sum(bounds[i]) / len(bounds[i]) if bounds[i] else math.nan,
                "ratio": g.bytes_per_expert * len(stored[i]) / sum(stored[i]),
                "ratio_min": min(per_expert), "ratio_max": max(per_expert),
                "original_bytes_per_expert": int(g.bytes_per_expert),
                "compressed_bytes_per_expert": sum(stored[i]) / len(stored[i]),
                "n_experts": len(picks[layer]), "n_experts_total": g.experts_per_layer,
                "max_err_over_bound": worst[i] if bounds[i] else math.nan,
                "source": "measured",
                "ratio_vs_bf16": bf16_bytes * len(stored[i]) / sum(stored[i]),
                "matrix": "all"})
            whole = rows[-1]
            if done_keys and done_key(layer, codec, level, opts, "all") in done_keys:
                rows.pop()    # measured before (this run adds matrix kinds)
            for k in kinds[1:]:
                if done_keys and done_key(layer, codec, level, opts, k) in done_keys:
                    continue
                # [values of the matrix] / [values of the expert] x the expert's checkpoint bytes
                share = values[k] / total_values
                orig, sizes = g.bytes_per_expert * share, by_kind[(i, k)]
                rows.append({**whole, "ratio": orig * len(sizes) / sum(sizes),
                             "ratio_min": min(orig / s for s in sizes),
                             "ratio_max": max(orig / s for s in sizes),
                             "original_bytes_per_expert": int(round(orig)),
                             "compressed_bytes_per_expert": sum(sizes) / len(sizes),
                             "ratio_vs_bf16": 2 * values[k] * len(sizes) / sum(sizes),
                             # bounds and errors are kept for the whole expert only
                             "abs_bound_mean": math.nan, "max_err_over_bound": math.nan,
                             "matrix": k})
    if progress:
        progress(total, total, "ratios")
    return pd.DataFrame(rows, columns=list(RATIO_COLUMNS) + list(OPTIONAL_COLUMNS) + ["matrix"])
