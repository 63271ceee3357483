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

from profiles.hardware import (AttentionTimings, BatchTimings, HardwareProfile, LevelCurve,
                               LinkFit, ModelTimings, ProfileSource, TokenCurve)
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
                spec = policy.expert_specs(*item.key).uniform
                if spec is None:
                    continue  # matrices of several codecs: no one codec's rate
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
    expert = _ffn_curve(ffn, f"expert spans {note}")
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


def _ffn_curve(ffn: dict[int, list[float]], note: str) -> TokenCurve:
    """Expert FFN seconds against tokens from spans: the median at each token count served by
    at least 5 spans, and above those a line `a + b * tokens` fitted to every span (a few
    prefill spans per token count are too noisy to stand alone)."""
    import numpy as np

    if not ffn:
        return TokenCurve((1,), (0.0,), "measured", note)
    med = statistics.median
    dense = sorted(t for t, v in ffn.items() if len(v) >= 5) or sorted(ffn)[:1]
    pts = {t: med(ffn[t]) for t in dense}
    xs = np.array([t for t, v in ffn.items() for _ in v], dtype=np.float64)
    ys = np.array([x for v in ffn.values() for x in v], dtype=np.float64)
    top = max(ffn)
    if top > dense[-1] and len(set(xs.tolist())) >= 2:
        b, a = np.polyfit(xs, ys, 1)
        b = max(float(b), 0.0)
        for t in sorted({top, *(2 ** k for k in range(1, 16) if dense[-1] < 2 ** k < top)}):
            pts[t] = max(pts[dense[-1]], float(a) + b * t)
        note += f"; above {dense[-1]} tokens a line fitted to all {xs.size} spans"
    tokens = tuple(sorted(pts))
    return TokenCurve(tokens, tuple(pts[t] for t in tokens), "measured", note)


CALIBRATION_BATCHES = (1, 4)


CALIBRATION_REPEATS = 3


# the disk tier is calibrated on a raw packed copy of the model written for it: only up to this
# many bytes of routed experts (a larger model's copy would cost more disk and time than the
# figure is worth; it is then left uncalibrated and the raw samples say so)
DISK_CALIBRATION_MAX_BYTES = 4 << 30


def runtime_calibration(model, base: HardwareProfile, *, device: str = "cpu", tokens: int = 32,
                        prompt: int = 16, batches: Sequence[int] = CALIBRATION_BATCHES,
                        repeats: int = CALIBRATION_REPEATS, disk_dir=None,
                        progress=None) -> tuple[HardwareProfile, dict]:
    """`base` calibrated on the runtime's own runs of `model` on `device`: per batch size, one
    all-hit run (every expert kept on the device after the warm-up: it times attention, router,
    LM head and everything else a step pays besides the experts, per layer) and one cold run of
    raw experts under a 25 % GPU budget (its copies give the link fit as the runtime performs
    them, its expert spans the FFN time by tokens); on the CPU device with the model in memory,
    also cold runs at the first batch size of a host codec's experts and of a codec's decoded in
    place (`sz3` and `szp`: `host_miss_overhead_s`, `decode_miss_overhead_s`, each fitted against
    the simulator by `fitted_overhead`), and cold runs of a raw packed copy written under `disk_dir`
    (default: the system's temporary directory) served from disk with 10 % of its experts in
    host memory (`disk_read_overhead_s`; models of up to `DISK_CALIBRATION_MAX_BYTES` of routed
    experts). Returns the profile and raw samples.

    Args:
        model: a model spec the runtime opens (`builtin`, a checkpoint or packed directory,
            `arch:…`); loaded once.
        base: the measured profile to calibrate (its device section must be `device`'s).
        tokens, prompt: decode steps and prompt tokens of each run.
        batches: batch sizes to calibrate (the attention figures are per batch).
        repeats: runs of each kind; the median run by tokens/s is the one calibrated on (one
            run of 32 steps swings by 20 % on a shared machine, and every prediction made with
            the profile inherits its error).
        disk_dir: where the disk tier's calibration copy is written (and removed afterwards).
        progress: `progress(done, total, label)` after each run.
    """
    from profiles.packed import is_packed
    from profiles.runtime.runner import measure_throughput, open_model
    from profiles.serving import ServingConfig

    loaded = model
    if isinstance(model, str) and not is_packed(model):
        from profiles.models import load_model
        from profiles.runtime.random_model import is_geometry_spec, random_model

        loaded = (random_model(str(model), device) if is_geometry_spec(str(model))
                  else load_model(str(model)))
    raw: dict = {}
    if not isinstance(loaded, str):
        base = expert_decode_rates(loaded, base, raw)
    pairs, runs_all = [], []
    repeats = max(1, int(repeats))
    # the CPU device with the model in memory: also a miss's extra work per kind of codec, and
    # a disk-tier read's
    cpu = not isinstance(loaded, str) and base.gpu is not None and base.gpu.serial
    if isinstance(loaded, str) and base.gpu is not None and base.gpu.serial:
        raw["overheads"] = ("not calibrated: the model was given as a packed directory; the "
                            "per-miss overheads of host codecs, of codecs decoded in place and of "
                            "disk reads need the model in memory (give its spec or checkpoint)")
    codecs = overhead_codecs(base) if cpu else {}
    disk = cpu and loaded.geometry.routed_expert_bytes <= DISK_CALIBRATION_MAX_BYTES
    if cpu and not disk:
        raw["disk_read_overhead_s"] = (
            f"not calibrated: {loaded.geometry.routed_expert_bytes / 2**30:.1f} GiB of routed "
            f"experts is more than the {DISK_CALIBRATION_MAX_BYTES / 2**30:.0f} GiB a "
            f"calibration copy may take")
    total, done = (2 * len(batches) + len(codecs) + disk) * repeats, 0

    def median_run(measure, label: str):
        nonlocal done
        runs = []
        for _ in range(repeats):
            runs.append(measure())
            done += 1
            if progress:
                progress(done, total, label)
        return sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2], runs
    store = None
    if not isinstance(loaded, str):
        store = open_model(loaded, None, torch_device(device))[3]
    for b in batches:
        sv = ServingConfig(batch_size=b, prompt_tokens=prompt, generated_tokens=tokens)
        warm, warms = median_run(lambda: measure_throughput(
            loaded, None, sv, device=device, warm_cache=True, store=store),
            f"calibration run, batch {b}, all hits")
        cold, colds = median_run(lambda: measure_throughput(
            loaded, None, replace(sv, gpu_mem_fraction=0.25), device=device, store=store),
            f"calibration run, batch {b}, 25% GPU budget")
        pairs.append((b, warm, cold))
        runs_all += [warm, cold]
        raw[f"batch {b}"] = {"all_hits_tokens_per_s": warm.tokens_per_s,
                             "cold_tokens_per_s": cold.tokens_per_s, "steps": warm.steps,
                             "all_hits_runs_tokens_per_s": [r.tokens_per_s for r in warms],
                             "cold_runs_tokens_per_s": [r.tokens_per_s for r in colds]}
    note = (f"from moesz runtime runs of {runs_all[0].model} on {device} (the median of "
            f"{repeats} all-hit runs and of {repeats} 25% GPU budget runs each, {tokens} decode "
            f"steps)")
    prof = calibrated_on_runs(base, pairs, note)
    if codecs:
        # what a miss of experts decoded on the host, or in place on the CPU device, and a read
        # from disk cost the model's thread beyond the figures above: cold runs at the first
        # batch size, each fitted against the simulator (`fitted_overhead`)
        from profiles.policy import Policy

        sv = ServingConfig(batch_size=batches[0], prompt_tokens=prompt, generated_tokens=tokens,
                           gpu_mem_fraction=0.25)
        for field, (name, mode, level) in codecs.items():
            pol = (Policy.uniform(name, mode, level, loaded.fingerprint) if level is not None
                   else Policy.uniform(name, fingerprint=loaded.fingerprint))
            st = open_model(loaded, pol, torch_device(device))[3]
            run, runs = median_run(lambda: measure_throughput(loaded, None, sv, device=device,
                                                              store=st),
                                   f"calibration run, batch {batches[0]}, {name} experts, 25% "
                                   f"GPU budget")
            prof = fitted_overhead(prof, run, field)
            raw[field] = {"policy": run.policy, "tokens_per_s": [r.tokens_per_s for r in runs],
                          "misses": run.transfers,
                          "seconds": getattr(prof.timings_for(run.geometry), field)}
    if disk:
        import tempfile

        from profiles.packed import pack
        from profiles.policy import Policy

        sv = ServingConfig(batch_size=batches[0], prompt_tokens=prompt, generated_tokens=tokens,
                           gpu_mem_fraction=0.25, host_mem_fraction=0.1,
                           disk_depth=base.host.disk_depth)
        with tempfile.TemporaryDirectory(prefix="moesz-calibration-", dir=disk_dir) as tmp:
            copy = pack(loaded, Policy.none(loaded.fingerprint), f"{tmp}/raw").path
            run, runs = median_run(lambda: measure_throughput(copy, None, sv, device=device),
                                   f"calibration run, batch {batches[0]}, raw experts from disk "
                                   f"(host 10%)")
        prof = fitted_overhead(prof, run, "disk_read_overhead_s")
        raw["disk_read_overhead_s"] = {
            "tokens_per_s": [r.tokens_per_s for r in runs], "reads": run.disk_reads,
            "depth": sv.disk_depth,
            "seconds": prof.timings_for(run.geometry).disk_read_overhead_s}
    for bt in prof.timings_for(runs_all[0].geometry).by_batch:
        raw[f"batch {bt.batch}"]["per_miss_overhead_s"] = bt.miss_overhead_s
    return prof, raw


def overhead_codecs(profile: HardwareProfile) -> dict[str, tuple[str, str | None, float | None]]:
    """The codec whose cold runs calibrate each per-miss overhead of the CPU device, as
    `{field: (codec, mode, level)}`: for host codecs `sz3` (else the profile's first host codec),
    for codecs decoded in place on the device `szp` (else the first error-bounded one), each at
    the middle of its measured levels."""
    from profiles.codecs import get_codec

    def pick(curves: dict, prefer: str):
        names = [n for n in curves if n != "raw"]
        bounded = [n for n in names if get_codec(n).error_bounded]
        name = prefer if prefer in curves else next(iter(bounded or names), None)
        if name is None:
            return None
        curve = curves[name]
        if not get_codec(name).error_bounded:
            return name, None, None
        return name, curve.mode or "meanabs", curve.levels[len(curve.levels) // 2]
    out = {}
    host = pick({n: c.decode for n, c in profile.host.codecs.items()}, "sz3")
    if host is not None:
        out["host_miss_overhead_s"] = host
    device = pick(dict(profile.gpu.decode), "szp") if profile.gpu is not None else None
    if device is not None:
        out["decode_miss_overhead_s"] = device
    return out


def fitted_overhead(profile: HardwareProfile, run: RunResult, field: str,
                    rounds: int = 3) -> HardwareProfile:
    """`profile` with one of the CPU device's overheads in the run's model timings (`field`:
    `host_miss_overhead_s` or `decode_miss_overhead_s` per miss, `disk_read_overhead_s` per disk
    read) fitted so that the simulator predicts `run`, a cold run that pays it: each round adds
    the run's measured time less the predicted, over its misses or reads (fixed-point steps that
    take the overhead to lie on the critical path, in the model's thread; where part of it
    overlaps other work a step undershoots, and the next round adds the rest)."""
    from sim.replay import predict_for_run

    mt = profile.timings_for(run.geometry)
    count = run.disk_reads if field == "disk_read_overhead_s" else run.transfers

    def at(x: float) -> HardwareProfile:
        return replace(profile, model_timings=tuple(
            replace(t, **{field: x}) if t is mt else t for t in profile.model_timings))
    x = 0.0
    for _ in range(rounds if count else 0):
        p = predict_for_run(run, at(x)).result
        x = max(0.0, x + (run.time_s - p.time_s) / count)
    return at(x)


def calibrated_on_runs(base: HardwareProfile, pairs: Sequence[tuple[int, RunResult, RunResult]],
                       note: str) -> HardwareProfile:
    """`base` calibrated on runtime runs of one model: per batch size `(batch, all-hit run, cold
    run)` (see `runtime_calibration`). On the CPU device the model timings also get, per batch,
    the expert FFN curve of the all-hit run and the runtime's seconds per fetched expert
    (`BatchTimings`): the cold run's step time not covered by its copies, decodes, experts (at
    the all-hit curve), LM head and the all-hit run's per-layer time, over its fetches."""
    pairs = sorted(pairs, key=lambda p: p[0])
    runs_all = [r for _, warm, cold in pairs for r in (warm, cold)]
    label = ", ".join(f"batch {b}" for b, _, _ in pairs)
    note = f"{note} ({label})"
    prof = calibrate_profile(base, runs_all[1::2], date=base.source.date, name=base.name)
    per_batch = [(b, model_timings_from_runs([warm, cold], "")) for b, warm, cold in pairs]
    mt = _merge_batches(per_batch, model_timings_from_runs(runs_all, note), note)
    gpu = prof.gpu
    if gpu is not None and gpu.serial:   # one copy for every direction on the CPU device
        by_batch = []
        for b, warm, cold in pairs:
            hits = model_timings_from_runs([warm], "")
            per_miss = miss_overhead_s([cold], hits)
            ffn = replace(hits.expert_ffn, note=f"expert spans of the all-hit run at batch {b} "
                                                f"{note}")
            by_batch.append(BatchTimings(b, ffn, per_miss))
        mt = replace(mt, by_batch=tuple(by_batch))
        link = gpu.h2d_pinned if runs_all[1].config.get("pinned", True) else gpu.h2d_pageable
        gpu = replace(gpu, h2d_pinned=link, h2d_pageable=link, d2h_pinned=link, d2h_pageable=link)
    others = tuple(t for t in prof.model_timings if t.model != mt.model)
    return replace(prof, gpu=gpu, model_timings=(mt,) + others)


def miss_overhead_s(cold_runs: Sequence[RunResult], mt: ModelTimings) -> float:
    """Seconds per miss that a step with misses pays beyond its copies, decodes, experts, LM head
    and the all-hit per-layer time: the runtime's own work per fetched expert (Python
    bookkeeping, allocation), which on the CPU device runs in the model's thread like the copy."""
    total, misses = 0.0, 0
    for r in cold_runs:
        g = r.geometry
        steps = sorted((a, b, item[1]) for track, item, a, b in r.spans if track == "steps")
        starts = [s[0] for s in steps]
        charged = [0.0] * len(steps)
        fetched = [0] * len(steps)
        for track, item, a, b in r.spans:
            k = bisect.bisect_right(starts, a) - 1
            if k < 0 or track == "steps":
                continue
            if track == "GPU compute" and isinstance(item, Computed):
                charged[k] += mt.expert_ffn.at(item.tokens)
            elif track == "GPU compute" and isinstance(item, tuple) and item[0] == "lm_head":
                charged[k] += b - a
            elif track in ("H2D link", "GPU decode") or (track == "GPU compute"
                                                         and isinstance(item, Job)):
                charged[k] += b - a
                if track == "H2D link":
                    fetched[k] += 1
        B, P = r.batch_size, r.prompt_tokens
        for k, (a, b, phase) in enumerate(steps):
            if phase != "decode" or not fetched[k]:
                continue
            rest = g.num_layers * mt.attention_router.at(B, P + k)
            total += (b - a) - charged[k] - rest
            misses += fetched[k]
    return max(0.0, total / misses) if misses else 0.0


def expert_decode_rates(loaded, base: HardwareProfile, raw: dict, repeats: int = 5
                        ) -> HardwareProfile:
    """`base` with every codec's decode speed re-measured on one real expert of `loaded`, decoded
    exactly as the runtime decodes a record (in place on the device, or on the host for host
    codecs), at the levels the profile already has: on small experts the per-tensor overhead
    of a decoder outweighs its bandwidth, which a speed measured on a 4 MiB tensor misses."""
    from profiles.hardware.fit import median_seconds
    from profiles.policy import Policy
    from profiles.runtime.store import ExpertStore
    from profiles.runtime.transfers import Transfers
    from profiles.runtime.timeline import Timeline

    import torch

    every = loaded.expert_map.experts
    picked = every[:: max(1, len(every) // 8)][:8]     # spread over the layers
    bf16 = 2.0 * sum(t.numel() for r in picked for t in r.tensors.values())
    cpu = torch.device("cpu")
    tr = Transfers(cpu, Timeline(cpu), cpu_workers=1)
    where = (f"{len(picked)} experts of {loaded.spec} spread over its layers, each decoded once "
             f"per sample as the runtime does")

    def curve(codec: str, old: LevelCurve, host: bool) -> LevelCurve:
        from profiles.codecs import get_codec

        levels = old.levels if get_codec(codec).error_bounded else (None,)
        rates = []
        for lv in levels:
            pol = (Policy.uniform(codec, old.mode or "meanabs", lv) if lv is not None
                   else Policy.uniform(codec))
            store = ExpertStore.from_tensors(((r.layer, r.expert, r.tensors) for r in picked),
                                             pol, None)
            recs = [store[(r.layer, r.expert)] for r in picked]
            bufs = [rec.host.clone() for rec in recs]

            def work():
                for rec, buf in zip(recs, bufs):
                    tr.host_weights(rec, None) if host else tr._views(rec, buf)

            med, _ = median_seconds(work, repeats, min_total_s=0.05)
            rates.append(bf16 / med / 1e9)
        raw[f"expert_decode.{codec}"] = {"levels": list(old.levels), "gbps": rates}
        return LevelCurve(old.levels if levels[0] is not None else old.levels[:1], tuple(rates),
                          "measured", old.mode,
                          f"{where} ({'host thread' if host else 'in place on the device'}), "
                          f"median of at least {repeats}")

    try:
        host = dict(base.host.codecs)
        for name, speed in host.items():
            host[name] = replace(speed, decode=curve(name, speed.decode, True))
        gpu = base.gpu
        if gpu is not None and gpu.serial:
            gpu = replace(gpu, decode={n: curve(n, c, False) for n, c in gpu.decode.items()})
    finally:
        tr.close()
    return replace(base, host=replace(base.host, codecs=host), gpu=gpu)


def torch_device(device: str):
    import torch

    return torch.device(device)


def _merge_batches(per_batch, combined: ModelTimings, note: str) -> ModelTimings:
    """One `ModelTimings` whose attention grid has a row per calibrated batch (and per prefill
    token count), expert FFN from all runs, LM head points of every batch."""
    rows: dict[int, tuple[float, ...]] = {}
    contexts = per_batch[0][1].attention_router.context_tokens
    heads: dict[int, float] = {}
    for _, mt in per_batch:
        a = mt.attention_router
        for b, row in zip(a.batch, a.seconds):
            curve = TokenCurve(a.context_tokens, row, "measured")
            rows.setdefault(b, tuple(curve.at(c) for c in contexts))
        if mt.lm_head is not None:
            for t, s in zip(mt.lm_head.tokens, mt.lm_head.seconds):
                heads.setdefault(t, s)
    batches = tuple(sorted(rows))
    attention = AttentionTimings(batches, contexts, tuple(rows[b] for b in batches), "measured",
                                 f"step time less expert and LM head spans, per layer, of all-hit "
                                 f"calibration runs {note}")
    lm = (TokenCurve(tuple(sorted(heads)), tuple(heads[t] for t in sorted(heads)), "measured",
                     f"LM head spans {note}") if heads else combined.lm_head)
    return replace(combined, attention_router=attention, lm_head=lm)
