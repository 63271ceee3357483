"""Hardware-profile figures read off the runtime's own timeline (operator profiling, as Vidur does).

A microbenchmark profile (`moesz profile hardware`) times bare kernels: a SwiGLU of the expert's
shape, scaled-dot-product attention, a 1 GiB copy, a 16 Mi-value decode. A served model also pays
for what those leave out — framework code between kernels, small-copy overheads, per-expert
launches. `calibrate_profile` replaces the figures a run measured in place, each from the spans
of one or more `RunResult`s on a CUDA device:

- the host-to-device link fit (`latency_s + bytes / gbps`) from the run's copies, by size;
- GPU decode GB/s per codec and level (bf16 bytes of the expert / decode span);
- the model's timings: expert FFN seconds against tokens served, attention + router seconds per
  decoder layer against context (decode) and for the prefill, LM head seconds (decode, prefill).

Everything it writes is labelled `measured` with a note naming the runs it came from. Comparing a
prediction made with such a profile against a run it was calibrated on is an in-sample check;
the fidelity script says which runs fed which profile.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import replace
from typing import Sequence

from profiles.hardware import (AttentionTimings, HardwareProfile, LevelCurve, LinkFit, ModelTimings,
                               ProfileSource, TokenCurve)
from profiles.runtime.results import RunResult
from profiles.runtime.timeline import Computed, Job


def calibrate_profile(base: HardwareProfile, runs: Sequence[RunResult], *,
                      name: str | None = None, date: str = "") -> HardwareProfile:
    """`base` with the link, decode and model-timing figures the runs measured.

    Args:
        base: the profile to start from (a measured one, or a preset).
        runs: runs of ONE model (its geometry names the timings) on the same machine.
        name: the new profile's name.
        date: ISO date for the profile's source record.
    """
    if not runs:
        return base
    label = ", ".join(f"{r.policy} ({r.steps} steps)" for r in runs)
    note = f"from moesz runtime traces of {runs[0].model}: {label}"
    gpu = base.gpu
    if gpu is not None:
        link = link_fit(runs, note)
        if link is not None:
            gpu = replace(gpu, **({"h2d_pinned": link} if runs[0].config.get("pinned", True)
                                  else {"h2d_pageable": link}))
        gpu = replace(gpu, decode={**gpu.decode, **decode_rates(runs, note)})
    timings = model_timings_from_runs(runs, note)
    others = tuple(t for t in base.model_timings if t.model != timings.model)
    source = ProfileSource(kind="measured", description=f"{base.source.description}; calibrated "
                           f"{note}", date=date or base.source.date, command=base.source.command,
                           hostname=base.source.hostname, packages=base.source.packages)
    return replace(base, name=name or f"{base.name} (calibrated)", gpu=gpu,
                   model_timings=(timings,) + others, source=source)


def link_fit(runs: Sequence[RunResult], note: str) -> LinkFit | None:
    """The copies' fit `latency_s + bytes / gbps` (None without copies)."""
    from profiles.hardware.fit import fit_link

    sizes, secs = [], []
    for r in runs:
        for track, item, a, b in r.spans:
            if track == "H2D link" and isinstance(item, Job) and item.nbytes > 0 and b > a:
                sizes.append(item.nbytes)
                secs.append(b - a)
    if not sizes:
        return None
    if len(set(sizes)) >= 2:
        fit = fit_link(sizes, secs)
        return LinkFit(fit.latency_s, fit.gbps, "measured", f"{len(sizes)} copies {note}",
                       fit.max_rel_error)
    gbps = statistics.median(n / s for n, s in zip(sizes, secs)) / 1e9
    return LinkFit(0.0, gbps, "measured", f"{len(sizes)} copies of one size {note}; latency "
                   f"folded into the rate")


def decode_rates(runs: Sequence[RunResult], note: str) -> dict[str, LevelCurve]:
    """GPU decode GB/s (of bf16 bytes) per codec, at the level the runs used."""
    samples: dict[tuple[str, str | None, float | None], list[float]] = {}
    for r in runs:
        g, policy = r.geometry, r.storage_policy
        bf16 = 2.0 * sum(math.prod(s) for _, s in g.expert_tensor_shapes)
        for track, item, a, b in r.spans:
            decode_track = track == "GPU decode" or (
                track == "GPU compute" and isinstance(item, Job) and item.kind != "cpu")
            if decode_track and isinstance(item, Job) and b > a:
                spec = policy.spec_for(*item.key)
                samples.setdefault((spec.codec, spec.mode, spec.level), []).append(bf16 / (b - a))
    out = {}
    for (codec, mode, level), rates in samples.items():
        out[codec] = LevelCurve((level if level else 1.0,), (statistics.median(rates) / 1e9,),
                                "measured", mode, f"median of {len(rates)} expert decodes {note}")
    return out


def model_timings_from_runs(runs: Sequence[RunResult], note: str) -> ModelTimings:
    """Expert FFN, attention + router and LM head timings of the runs' model.

    Attention + router per decoder layer comes, when one of the runs is a calibration run in which
    every expert hit (no copies: `measure_throughput(..., warm_cache=True)` with an unlimited
    budget), from its steps: (step wall time - expert spans - LM head) / decoder layers, which
    folds every cost the simulator does not name (framework code, launches, synchronisation)
    into the per-layer figure. Otherwise it comes from the attention spans alone.
    """
    g = runs[0].geometry
    ffn: dict[int, list[float]] = {}
    spans_dec: dict[int, list[float]] = {}
    spans_pre: list[float] = []
    rest_dec: dict[int, list[float]] = {}
    rest_pre: list[float] = []
    head: dict[str, list[float]] = {"prefill": [], "decode": []}
    B, P = runs[0].batch_size, runs[0].prompt_tokens
    per_step = []          # (run, steps, [(kind, tokens or phase) inside each step])
    for r in runs:
        steps = sorted((a, b, item[1]) for track, item, a, b in r.spans if track == "steps")
        starts = [s[0] for s in steps]
        inside: list[list[tuple[str, object]]] = [[] for _ in steps]
        for track, item, a, b in r.spans:
            if track != "GPU compute" or b <= a:
                continue
            k = bisect.bisect_right(starts, a) - 1
            if k < 0:
                continue
            phase = steps[k][2]
            if isinstance(item, Computed):
                ffn.setdefault(item.tokens, []).append(b - a)
                inside[k].append(("expert", item.tokens))
            elif isinstance(item, tuple) and item[0] == "attention":
                (spans_pre if phase == "prefill" else spans_dec.setdefault(P + k, [])).append(b - a)
            elif isinstance(item, tuple) and item[0] == "lm_head":
                head[phase].append(b - a)
                inside[k].append(("lm_head", phase))
        per_step.append((r, steps, inside))
    med = statistics.median
    # what the simulator will charge for the experts and the LM head: their medians
    ffn_med = {t: med(v) for t, v in ffn.items()}
    head_med = {ph: med(v) for ph, v in head.items() if v}
    for r, steps, inside in per_step:
        if r.transfers or r.cpu_expert_runs:
            continue
        for k, (a, b, phase) in enumerate(steps):
            charged = sum(ffn_med[x] if kind == "expert" else head_med[x] for kind, x in inside[k])
            per_layer = max(0.0, (b - a - charged) / g.num_layers)
            (rest_pre if phase == "prefill" else rest_dec.setdefault(P + k, [])).append(per_layer)
    dec, pre = (rest_dec, rest_pre) if rest_dec else (spans_dec, spans_pre)
    how = ("step time less expert and LM head spans, per layer, of an all-hit calibration run"
           if rest_dec else "attention spans (decoder layer start to the experts)")
    tokens = tuple(sorted(ffn))
    expert = TokenCurve(tokens or (1,), tuple(med(ffn[t]) for t in tokens) or (0.0,), "measured",
                        f"expert spans {note}")
    contexts = tuple(sorted(dec)) or (P,)
    row = tuple(med(dec[c]) for c in sorted(dec)) or (med(pre) if pre else 0.0,)
    batches, grid = (B,), (row,)
    if pre and B * P > B:
        batches, grid = (B, B * P), (row, tuple(med(pre) for _ in contexts))
    attention = AttentionTimings(batches, contexts, grid, "measured", f"{how} {note}")
    lm = None
    if head["decode"]:
        pts = [(B, med(head["decode"]))]
        if head["prefill"] and B * P > B:
            pts.append((B * P, med(head["prefill"])))
        lm = TokenCurve(tuple(p[0] for p in pts), tuple(p[1] for p in pts), "measured",
                        f"LM head spans {note}")
    return ModelTimings(model=g.name, hidden_size=g.hidden_size,
                        expert_intermediate_size=g.expert_intermediate_size, expert_ffn=expert,
                        attention_router=attention, lm_head=lm)
