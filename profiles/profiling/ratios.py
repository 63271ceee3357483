"""Compression ratios of each MoE layer's real expert weights, per codec, mode and level.

For every MoE layer x codec x level, the layer's experts (all of them, or a seeded sample with the
spread over the sample reported) go through a real encode -> decode round trip. The ratio counts
every stored byte (blob header included) against the expert's bytes in the CHECKPOINT dtype
(`geometry.bytes_per_expert`: bf16 counts 2 bytes a value, FP8 one), and the decoded tensor is
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
Progress = Callable[[int, int, str], None]


def sample_experts(experts_per_layer: int, sample: int | None, layer: int, seed: int) -> list[int]:
    """All expert indices, or a seeded sample of `sample` of them (sorted), per layer."""
    if sample is None or sample >= experts_per_layer:
        return list(range(experts_per_layer))
    rng = random.Random(f"ratios:{seed}:{layer}")
    return sorted(rng.sample(range(experts_per_layer), sample))


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


def measure_ratios(loaded, codecs: Sequence[str], mode: str, levels: Sequence[float], *,
                   sample: int | None = None, seed: int = 0, codec_options: dict | None = None,
                   layers: Sequence[int] | None = None, done_keys: set | None = None,
                   progress: Progress | None = None):
    """Measure ratios on a loaded model's real expert weights.

    Args:
        loaded: a `profiles.models.LoadedModel`.
        codecs: codec names (the baselines are added).
        mode: bound mode of the bounded codecs.
        levels: bound levels.
        sample: experts per layer to measure (None: all), drawn with `seed`.
        codec_options: per-codec options, e.g. {"sz3": {"predictor": "lorenzo"}}.
        layers: MoE layers to measure (default all).
        done_keys: (layer, codec, level) already measured (skipped, for resuming).
        progress: `progress(done, total, label)` per layer x codec x level.

    Returns:
        A pandas DataFrame with `RATIO_COLUMNS`.
    """
    import pandas as pd

    from profiles.codecs import roundtrip

    g, emap = loaded.geometry, loaded.expert_map
    layers = tuple(layers) if layers is not None else tuple(emap.moe_layers)
    runs = ratio_runs(codecs, mode, levels, codec_options)
    todo = [(layer, run) for layer in layers for run in runs
            if not done_keys or (layer, run[0], run[2]) not in done_keys]
    rows = []
    for i, (layer, (codec, rmode, level, opts)) in enumerate(todo):
        if progress:
            progress(i, len(todo), f"ratios layer {layer} {codec} {'' if level is None else level}")
        picks = sample_experts(g.experts_per_layer, sample, layer, seed)
        stored, bounds, worst = [], [], 0.0
        for e in picks:
            ref = emap.get(layer, e)
            nbytes = 0
            for t in ref.tensors.values():
                with torch.no_grad():
                    decoded, blob = roundtrip(t, codec, None if rmode == "none" else rmode, level,
                                              **opts)
                nbytes += blob.nbytes
                if blob.abs_bound:
                    bounds.append(blob.abs_bound)
                    err = float((decoded.float() - t.detach().float()).abs().max())
                    worst = max(worst, err / blob.abs_bound)
            stored.append(nbytes)
        per_expert = [g.bytes_per_expert / s for s in stored]
        rows.append({
            "layer": layer, "codec": codec, "mode": rmode,
            "level": math.nan if level is None else float(level),
            "codec_options": json.dumps(opts, sort_keys=True),
            "abs_bound_mean": sum(bounds) / len(bounds) if bounds else math.nan,
            "ratio": g.bytes_per_expert * len(stored) / sum(stored),
            "ratio_min": min(per_expert), "ratio_max": max(per_expert),
            "original_bytes_per_expert": int(g.bytes_per_expert),
            "compressed_bytes_per_expert": sum(stored) / len(stored),
            "n_experts": len(picks), "n_experts_total": g.experts_per_layer,
            "max_err_over_bound": worst if bounds else math.nan,
            "source": "measured"})
    if progress:
        progress(len(todo), len(todo), "ratios")
    return pd.DataFrame(rows, columns=list(RATIO_COLUMNS))
