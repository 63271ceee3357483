"""The single GPU check: everything moesz needs a CUDA device to verify or measure, in one run.

    python benchmarks/gpu_check.py --out runs/gpu                 # on a GPU machine (< 5 minutes)
    python benchmarks/gpu_check.py --dry-run --out runs/gpu-dry   # CPU: the same checks, small,
                                                                  # Triton under TRITON_INTERPRET=1

Checks (each recorded as passed / failed / skipped with its figures, never stopping the others):
  env                  torch, triton, device, capability
  szp_triton_bytes     fused Triton encode/decode vs the numpy reference, byte for byte: partial
                       blocks, > 1024 blocks, fixed and plain, fp32/bf16/fp16 inputs, tricky values
  szp_torch_cuda_bytes the vectorized torch implementation on CUDA vs the reference
  szp_large_agree      a 64 M-value tensor: Triton vs torch-CUDA streams and decodes agree
  szp_decode_dtypes    fused bf16/fp16 output equals rounding the fp32 reference output
  cuszp_bytes          libcuSZp (MOESZ_CUSZP_LIB) streams vs the reference; skipped without it
  szp_speed_1gib       fused decode (bf16 output) and encode GB/s for a 1 GiB bf16 tensor,
                       median of CUDA-event timings; device-to-device copy GB/s for scale
  hardware_profile     the full measured hardware profile (host, GPU, built-in model timings)
                       -> OUT/h200.json, to commit as profiles/presets/h200.json (preset:h200)
  formats_triton_bytes the Triton dequantization kernels of gq, nf4, mxfp4 and the GGUF types vs
                       their CPU decoders, bit for bit, fp32/bf16/fp16 output, partial blocks
  formats_speed_1gib   their decode GB/s (bf16 output) on a 1 GiB bf16 tensor
  ans_bytes            the `ans` Triton decoder vs the numpy reference decode, bit for bit:
                       partial chunks, several chunks, bf16/fp16/fp32/fp8, strict and relaxed
  szp_strict_patches   strict szp blobs encoded on the GPU: GPU and CPU decodes equal, bound held
  ans_speed_1gib       `ans` decode GB/s of bf16 output for a 1 GiB bf16 tensor (CPU-encoded),
                       chunks per program 1/2/4/8, and bit identity with the CPU decode

Imports only torch, numpy and moesz's codec modules (no pysz, zstandard, typer). Results are written
as JSON to OUT/gpu_check.json. Later issues add their checks to CHECKS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:                     # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from profiles.codecs import szp_reference as ref  # noqa: E402
from profiles.codecs import szp_torch  # noqa: E402

EB = float(np.float32(1e-3))


class Ctx:
    def __init__(self, dry: bool):
        self.dry = dry
        self.dev = torch.device("cpu" if dry else "cuda")

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()


def weights(n: int, seed: int, outlier: bool = True) -> np.ndarray:
    x = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    if outlier and n > 1000:
        x[777] = 3.0                       # a block needing more than 8 bit planes
    return x


def tricky(n: int, eb: float) -> np.ndarray:
    """Values whose d = x * 0.5/eb sits on or next to .5 boundaries, zeros, subnormals."""
    k = np.arange(n, dtype=np.float32) % 97 - 48
    x = (k + np.float32(0.5)) * np.float32(2 * eb)
    x[::5] = np.nextafter(x[::5], np.float32(0))
    x[::7] = 0.0
    x[3::11] = np.float32(1e-41)
    x[4::13] = -np.float32(0.0)
    return x.astype(np.float32)


def check_env(ctx: Ctx) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "dry_run": ctx.dry}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1))
    return info


def check_szp_triton_bytes(ctx: Ctx) -> dict:
    from profiles.codecs import szp_triton

    sizes = [1, 33, 1000, 32769] if ctx.dry else \
        [1, 31, 33, 1000, 32768, 32769, 3 * 32768 + 17, (1 << 20) + 5]
    dtypes = (torch.float32, torch.bfloat16) if ctx.dry else (torch.float32, torch.bfloat16,
                                                               torch.float16)
    cases = 0
    for n in sizes:
        for kind in ("weights", "tricky") if (n <= 1000 or not ctx.dry) else ("weights",):
            x = weights(n, n) if kind == "weights" else tricky(n, EB)
            for variant in ("fixed", "plain"):
                for dt in dtypes:
                    xt = torch.from_numpy(x).to(dt)
                    x32 = xt.float().numpy()
                    s_ref, i_ref = ref.encode(x32, EB, variant)
                    s, i = szp_triton.encode(xt.to(ctx.dev), EB, variant)
                    ctx.sync()
                    where = f"n={n} {kind} {variant} {dt}"
                    assert np.array_equal(s.cpu().numpy(), s_ref), f"encode stream differs: {where}"
                    assert np.array_equal(i.cpu().numpy(), i_ref.astype(np.int64)), f"index: {where}"
                    y = szp_triton.decode(s, i, n, EB, variant)
                    assert np.array_equal(y.cpu().numpy(), ref.decode(s_ref, n, EB, variant)), \
                        f"decode differs: {where}"
                    cases += 1
    return {"cases": cases, "sizes": sizes}


def check_szp_torch_cuda_bytes(ctx: Ctx) -> dict:
    sizes = [33, 32769] if ctx.dry else [33, 32769, 3 * 32768 + 17, (1 << 20) + 5]
    for n in sizes:
        x = weights(n, 100 + n)
        for variant in ("fixed", "plain"):
            s_ref, _ = ref.encode(x, EB, variant)
            s, _ = szp_torch.encode(torch.from_numpy(x).to(ctx.dev), EB, variant)
            assert np.array_equal(s.cpu().numpy(), s_ref), f"n={n} {variant}"
            y = szp_torch.decode(s, n, EB, variant)
            assert np.array_equal(y.cpu().numpy(), ref.decode(s_ref, n, EB, variant))
    return {"sizes": sizes}


def check_szp_large_agree(ctx: Ctx) -> dict:
    from profiles.codecs import szp_triton

    n = 32768 + 99 if ctx.dry else (1 << 26) + 3          # > 1024 blocks either way
    x = (torch.randn(n, device=ctx.dev) * 0.02).bfloat16()
    for variant in ("fixed", "plain"):
        s_k, i_k = szp_triton.encode(x, EB, variant)
        s_t, i_t = szp_torch.encode(x, EB, variant)
        assert torch.equal(s_k, s_t) and torch.equal(i_k, i_t), variant
        y_k = szp_triton.decode(s_k, i_k, n, EB, variant, torch.bfloat16)
        y_t = szp_torch.decode(s_t, n, EB, variant).to(torch.bfloat16)
        assert torch.equal(y_k, y_t), variant
        assert float((y_k.float() - x.float()).abs().max()) <= EB * (1 + 2 ** -20) + 2 ** -9
    return {"values": n, "stream_bytes_fixed": int(s_k.numel())}


def check_szp_decode_dtypes(ctx: Ctx) -> dict:
    from profiles.codecs import szp_triton

    n = 2001 if ctx.dry else 50_001
    x = weights(n, 7)
    out = {}
    for variant in ("fixed", "plain"):
        s_ref, i_ref = ref.encode(x, EB, variant)
        d = torch.from_numpy(ref.decode(s_ref, n, EB, variant))
        s, i = torch.from_numpy(s_ref).to(ctx.dev), torch.from_numpy(i_ref.astype(np.int64)).to(ctx.dev)
        for dt in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
            y = szp_triton.decode(s, i, n, EB, variant, dt).cpu()
            want = d.clamp(-448, 448).to(dt) if dt == torch.float8_e4m3fn else d.to(dt)
            assert torch.equal(y.view(torch.uint8), want.view(torch.uint8)), f"{variant} {dt}"
            out[f"{variant}-{dt}"] = "equal"
    return out


def check_cuszp_bytes(ctx: Ctx) -> dict:
    if not os.environ.get("MOESZ_CUSZP_LIB"):
        return {"status": "skipped", "reason": "MOESZ_CUSZP_LIB is not set (libcuSZp not built)"}
    if ctx.dry:
        return {"status": "skipped", "reason": "dry run: libcuSZp needs a GPU"}
    from profiles.codecs import cuszp

    sizes = [33, 32769, 3 * 32768 + 17, (1 << 20) + 5]
    for n in sizes:
        for kind in ("weights", "tricky"):
            x = weights(n, n) if kind == "weights" else tricky(n, EB)
            for variant in ("fixed", "plain"):
                s_ref, _ = ref.encode(x, EB, variant)
                s = cuszp.compress(torch.from_numpy(x).cuda(), EB, variant)
                assert np.array_equal(s.cpu().numpy(), s_ref), f"cuSZp stream differs n={n} {kind} {variant}"
                y = cuszp.decompress(torch.from_numpy(s_ref).cuda(), n, EB, variant)
                assert np.array_equal(y.cpu().numpy(), ref.decode(s_ref, n, EB, variant))
    return {"sizes": sizes, "identical": True}


def _time_ms(ctx: Ctx, fn, repeats: int) -> float:
    fn()
    ctx.sync()
    times = []
    for _ in range(repeats):
        if ctx.dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times))


def check_szp_speed_1gib(ctx: Ctx) -> dict:
    from profiles.codecs import szp_triton

    n = (1 << 13) if ctx.dry else (1 << 29)           # 2^29 bf16 values = 1 GiB
    repeats = 1 if ctx.dry else 10
    tiles = (64,) if ctx.dry else (32, 64, 128)
    gen = torch.Generator(device=ctx.dev).manual_seed(0)
    x = (torch.randn(n, device=ctx.dev, generator=gen) * 0.02).bfloat16()
    mean_abs = float(x.float().abs().mean())
    res = {"values": n, "bf16_bytes": 2 * n, "repeats": repeats,
           "timing": "perf_counter, dry run: figures meaningless" if ctx.dry
           else "median of CUDA events after one warm-up"}
    copy_ms = _time_ms(ctx, lambda: x.clone(), repeats)
    res["d2d_copy_gbps"] = round(2 * (2 * n) / copy_ms / 1e6, 1)      # read + write
    for label, eb in (("abs_1e-3", EB), ("meanabs_0.5", float(np.float32(0.5 * mean_abs)))):
        s, i = szp_triton.encode(x, eb, "fixed")
        enc_ms = _time_ms(ctx, lambda: szp_triton.encode(x, eb, "fixed"), repeats)
        row = {"abs_bound": eb, "ratio_stream_and_index_vs_bf16": round(2 * n / (s.numel() + 4 * i.numel()), 4),
               "encode_gbps": round(2 * n / enc_ms / 1e6, 1)}
        for tile in tiles:
            szp_triton.DECODE_TILE_BLOCKS = tile
            ms = _time_ms(ctx, lambda: szp_triton.decode(s, i, n, eb, "fixed", torch.bfloat16), repeats)
            row[f"decode_gbps_tile{tile}"] = round(2 * n / ms / 1e6, 1)
        szp_triton.DECODE_TILE_BLOCKS = 64
        row["decode_gbps_best"] = max(v for k, v in row.items() if k.startswith("decode_gbps_tile"))
        res[label] = row
    res["target_decode_gbps"] = 500
    res["meets_target"] = (not ctx.dry) and res["meanabs_0.5"]["decode_gbps_best"] >= 500
    return res


# --- runtime fidelity (issue 8; owned by the runtime's contributor) ---------------------------
# The real offloaded runtime (profiles.runtime) and the simulator (sim) on the same configuration:
# the simulator replays the routing the runtime recorded, with the experts' measured sizes and the
# same serving configuration (sim.replay.predict_for_run), on two hardware profiles:
#   micro      - the GPU section measured on this machine by microbenchmarks
#                (profiles.hardware.measure_gpu) and the model's timings by microbenchmarks
#                (profiles.hardware.timings.model_timings): an out-of-sample prediction;
#   calibrated - the same with link, decode and model timings read off the runtime's own traces
#                (profiles.runtime.calibrate): attention + framework time from an all-hit run
#                (unlimited memory, warm cache), link and decode from the measured runs themselves
#                (in-sample for those two figures).
# Models: the built-in model, and random weights of Mixtral-8x7B's expert geometry (4 layers)
# under a budget that leaves the cache about a quarter of the experts (>= 50 % misses). Needs
# transformers, pandas and simpy (carry simpy's wheel to a GPU machine that lacks it).

RT_MIXTRAL = "arch:mixtral,num_hidden_layers=4"
RT_TINY = ("arch:mixtral,hidden_size=64,intermediate_size=96,num_hidden_layers=2,"
           "num_local_experts=4,vocab_size=128,num_attention_heads=4,num_key_value_heads=2")


def _rt_hardware(ctx: Ctx):
    """(profile, how it was obtained) for the simulator: one measured earlier in this run if a
    check left it in ctx.hardware_profile, else this GPU measured here on top of the published
    preset's host section (the configurations below use no host codec)."""
    from dataclasses import replace

    from profiles.hardware import ProfileSource, load_hardware

    base = load_hardware("preset:h200-published")
    earlier = getattr(ctx, "hardware_profile", None)
    if earlier is not None:
        return earlier, "measured earlier in this gpu_check run"
    if ctx.dry:
        return base, "dry run: preset:h200-published (figures meaningless)"
    from profiles.hardware.measure_gpu import measure_gpu

    raw: dict = {}
    gpu = measure_gpu((0.5,), "meanabs", raw, lambda label: None)
    src = ProfileSource("measured", "GPU section measured by benchmarks/gpu_check.py "
                        "(profiles.hardware.measure_gpu); host section from preset:h200-published",
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return replace(base, name=gpu.name, gpu=gpu, source=src, raw=raw), \
        "GPU section measured here (measure_gpu), host section published preset"


def _rt_err(pred: float, meas: float) -> float | None:
    return None if not meas else round((pred - meas) / meas, 4)


def check_runtime_fidelity(ctx: Ctx) -> dict:
    from dataclasses import replace

    from sim.replay import predict_for_run, trace_document
    from profiles.errors import ModelError
    from profiles.hardware.timings import model_timings
    from profiles.models import load_model
    from profiles.policy import Policy
    from profiles.runtime import ExpertStore, measure_throughput
    from profiles.runtime.calibrate import calibrate_profile
    from profiles.runtime.random_model import random_model
    from profiles.serving import ServingConfig

    dev = ctx.dev
    hw, hw_how = _rt_hardware(ctx)
    policies = [("no compression", Policy.none()),
                ("szp meanabs 0.5", Policy.uniform("szp", "meanabs", 0.5))]
    steps = 4 if ctx.dry else None
    configs = [("builtin", 0.4, steps or 64), ("mixtral-8x7b geometry, 4 layers, random", 0.25,
                                               steps or 32)]
    rows, notes = [], [f"hardware profile: {hw_how}"]
    for name, fraction, tokens in configs:
        t0 = time.perf_counter()
        if name == "builtin":
            try:
                lm = load_model("builtin")
            except ModelError as exc:
                notes.append(f"builtin model unavailable ({exc}); used {RT_TINY} instead")
                lm = random_model(RT_TINY, dev)
        else:
            lm = random_model(RT_TINY if ctx.dry else RT_MIXTRAL, dev)
        sv = ServingConfig(gpu_mem_fraction=fraction, prompt_tokens=16 if not ctx.dry else 4,
                           generated_tokens=tokens)
        encode_on = dev if dev.type == "cuda" else None
        stores = {label: ExpertStore.from_loaded(lm, pol, pin=dev.type == "cuda",
                                                 encode_device=encode_on)
                  for label, pol in policies}
        cal = measure_throughput(lm, serving=replace(sv, gpu_mem_fraction=None),
                                 store=stores["no compression"], device=dev, warm_cache=True)
        runs = {label: measure_throughput(lm, serving=sv, store=stores[label], device=dev)
                for label, _ in policies}
        mt = model_timings(lm.geometry, hw.host, hw.gpu if dev.type == "cuda" else None, {},
                           quick=ctx.dry)
        hw_micro = replace(hw, model_timings=(mt,))
        hw_cal = calibrate_profile(hw_micro, [cal, *runs.values()])
        peak = hw.gpu.h2d_pinned.gbps if hw.gpu is not None else None
        for label, r in runs.items():
            pm = predict_for_run(r, hw_micro).result
            pc = predict_for_run(r, hw_cal, record=True)
            rows.append({
                "model": name, "policy": label, "gpu_mem": f"{fraction:.0%} of experts",
                "decode_steps": r.steps, "miss_rate": round(1 - r.hit_rate, 3),
                "measured_tokens_per_s": round(r.tokens_per_s, 3),
                "measured_tpot_ms": round(r.tpot_s * 1e3, 3),
                "predicted_micro_tokens_per_s": round(pm.tokens_per_s, 3),
                "predicted_micro_tpot_ms": round(pm.tpot_s * 1e3, 3),
                "error_micro": _rt_err(pm.tokens_per_s, r.tokens_per_s),
                "predicted_calibrated_tokens_per_s": round(pc.result.tokens_per_s, 3),
                "predicted_calibrated_tpot_ms": round(pc.result.tpot_s * 1e3, 3),
                "error_calibrated": _rt_err(pc.result.tokens_per_s, r.tokens_per_s),
                "bytes_h2d_measured": r.bytes_h2d, "bytes_h2d_predicted": pm.bytes_h2d,
                "link_gbps_achieved": r.link_achieved_gbps, "link_gbps_profile_peak": peak,
                "decode_overlap_fraction": r.decode_overlap_fraction,
                "decode_busy_fraction": round(r.decode_busy_fraction, 4),
                "ratio_vs_original": round(lm.geometry.routed_expert_bytes /
                                           r.host_expert_bytes, 3)})
            out = getattr(ctx, "out", None)
            if out is not None and label != "no compression":
                slug = "builtin" if name == "builtin" else "mixtral4"
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / f"runtime_trace_{slug}.json").write_text(json.dumps(
                    trace_document(r, pc, {"model": name, "policy": label,
                                           "hardware": hw_cal.name})))
        notes.append(f"{name}: {time.perf_counter() - t0:.1f} s (model, stores, 4 runs)")
        del lm, stores, cal, runs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    head = ("| model | policy | GPU budget | miss rate | tok/s measured | tok/s predicted (micro) | "
            "err | tok/s predicted (calibrated) | err | TPOT ms measured | link GB/s achieved / "
            "peak | decode-transfer overlap |")
    lines = [head, "|" + "---|" * 12]
    for x in rows:
        link = ("n/a" if x["link_gbps_achieved"] is None else
                f"{x['link_gbps_achieved']:.1f} / {x['link_gbps_profile_peak'] or float('nan'):.1f}")
        ov = "n/a" if x["decode_overlap_fraction"] is None else f"{x['decode_overlap_fraction']:.2f}"
        em, ec = (("n/a" if e is None else f"{e:+.1%}") for e in (x["error_micro"],
                                                                  x["error_calibrated"]))
        lines.append(f"| {x['model']} | {x['policy']} | {x['gpu_mem']} | {x['miss_rate']:.2f} | "
                     f"{x['measured_tokens_per_s']:.2f} | {x['predicted_micro_tokens_per_s']:.2f} | "
                     f"{em} | {x['predicted_calibrated_tokens_per_s']:.2f} | "
                     f"{ec} | {x['measured_tpot_ms']:.2f} | {link} | {ov} |")
    return {"rows": rows, "table_markdown": "\n".join(lines), "notes": notes,
            "target": "within 15 %, goal 10 % (recorded, not asserted)"}


# --- hardware profile (issue 4, the profiler) ----------------------------------------------------

HW_PRESET = "h200"


def check_hardware_profile(ctx: Ctx) -> dict:
    """Measure this machine with `moesz profile hardware` (host, GPU, built-in model timings) and
    write OUT/h200.json — commit it as profiles/presets/h200.json (`preset:h200`). Later checks
    reuse it through ctx.hardware_profile. Dry run: a quick host-only profile, not a preset."""
    from profiles.hardware import save_hardware
    from profiles.hardware.measure import measure_hardware

    dry = ctx.dev.type != "cuda"
    name = "dry-run" if dry else HW_PRESET
    cmd = "python benchmarks/gpu_check.py --only hardware_profile"
    prof = measure_hardware("builtin", name=name, quick=dry, gpu=not dry, command=cmd)
    path = ctx.out / f"{name}.json"
    save_hardware(prof, path)
    if not dry:
        ctx.hardware_profile = prof
    g = prof.gpu
    out = {"file": str(path), "gpu": None if g is None else g.name,
           "memcpy_gbps": round(prof.host.memcpy_gbps.value, 2)}
    if g is not None:
        out.update({
            "h2d_pinned_gbps": round(g.h2d_pinned.gbps, 2),
            "h2d_pinned_latency_us": round(g.h2d_pinned.latency_s * 1e6, 2),
            "h2d_pinned_fit_err": round(g.h2d_pinned.fit_rel_error or 0, 3),
            "h2d_pageable_gbps": round(g.h2d_pageable.gbps, 2),
            "d2h_pinned_gbps": round(g.d2h_pinned.gbps, 2),
            "h2d_under_compute_gbps": round(g.h2d_under_compute_gbps.value, 2),
            "bf16_gemm_tflops": round(g.bf16_gemm_tflops.value, 1),
            "d2d_gbps": round(g.d2d_gbps.value, 1),
            "szp_decode_gbps": {f"{lv:g}": round(v, 1) for lv, v in
                                zip(g.decode["szp"].levels, g.decode["szp"].gbps)}
            if "szp" in g.decode else None})
    return out


# --- the quantized formats users run (issues 14 and 20; owned by the codecs' contributor) --------
# Each family's Triton dequantization kernel against its CPU decoder, bit for bit, then its
# decode GB/s (bf16 output) on a 1 GiB bf16 tensor. The payload for 1 GiB is an encoded 4 Mi-value
# tensor repeated (blocks are independent; gq's and nf4's separate arrays are repeated one by one),
# because the numpy encoders would take minutes on 2^29 values.
FORMAT_CASES = [("gq", "gq_triton", {"bits": 4, "group": 64}), ("gq", "gq_triton", {"bits": 3, "group": 128}),
                ("nf4", "nf4_triton", {"dq": True}), ("nf4", "nf4_triton", {"dq": False}),
                ("mxfp4", "mxfp4_triton", {"scale": "ocp"})] + \
    [("kquants", "kquants_triton", {"qtype": t}) for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")]


def _format_modules(fmt_name: str, kern_name: str):
    import importlib

    return (importlib.import_module("profiles.codecs." + fmt_name),
            importlib.import_module("profiles.codecs." + kern_name))


def check_formats_triton_bytes(ctx: Ctx) -> dict:
    from profiles.codecs.dtypes import cast_back, dtype_name

    sizes = [33, 2085] if ctx.dry else [33, 2085, 3 * (1 << 20) + 17]
    cases = 0
    for fmt_name, kern_name, opts in FORMAT_CASES:
        fmt, kern = _format_modules(fmt_name, kern_name)
        for n in sizes:
            x = weights(n, n)
            p = torch.from_numpy(fmt.encode(x, **opts))
            ref_out = fmt.decode(p, n, **opts)
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                y = kern.decode(p.to(ctx.dev), n, dt, **opts).cpu()
                want = cast_back(ref_out, dtype_name(dt))
                bits = torch.int32 if dt == torch.float32 else torch.int16
                if not torch.equal(y.view(bits), want.view(bits)):
                    raise AssertionError(f"{kern_name} {opts} n={n} {dt}: differs from the CPU decode")
                cases += 1
    return {"cases": cases, "sizes": sizes}


def _repeat_payload(fmt_name: str, p: np.ndarray, n: int, reps: int, opts: dict) -> np.ndarray:
    """The payload of `reps` copies of an n-value tensor, from one copy's payload."""
    if fmt_name == "gq":
        g = -(-n // opts["group"])
        return np.concatenate([np.tile(p[:2 * g], reps), np.tile(p[2 * g:4 * g], reps),
                               np.tile(p[4 * g:], reps)])
    if fmt_name == "nf4":
        b = -(-n // 64)
        if not opts["dq"]:
            return np.concatenate([np.tile(p[:4 * b], reps), np.tile(p[4 * b:], reps)])
        c = -(-b // 256)
        return np.concatenate([p[:4], np.tile(p[4:4 + 4 * c], reps),
                               np.tile(p[4 + 4 * c:4 + 4 * c + b], reps),
                               np.tile(p[4 + 4 * c + b:], reps)])
    return np.tile(p, reps)


def check_formats_speed_1gib(ctx: Ctx) -> dict:
    n1 = (1 << 12) if ctx.dry else (1 << 22)
    reps = 2 if ctx.dry else 128                      # 2^29 bf16 values = 1 GiB
    repeats = 1 if ctx.dry else 10
    n = n1 * reps
    x = weights(n1, 0, outlier=False)
    res = {"values": n, "bf16_bytes": 2 * n, "repeats": repeats,
           "timing": "perf_counter, dry run: figures meaningless" if ctx.dry
           else "median of CUDA events after one warm-up"}
    for fmt_name, kern_name, opts in FORMAT_CASES:
        fmt, kern = _format_modules(fmt_name, kern_name)
        one = fmt.encode(x, **opts)
        p = torch.from_numpy(_repeat_payload(fmt_name, one, n1, reps, opts)).to(ctx.dev)
        if not ctx.dry:
            first = kern.decode(p, n, torch.bfloat16, **opts)[:n1].cpu()
            assert torch.equal(first, fmt.decode(torch.from_numpy(one), n1, **opts).bfloat16())
        ms = _time_ms(ctx, lambda: kern.decode(p, n, torch.bfloat16, **opts), repeats)
        label = fmt_name if fmt_name != "kquants" else opts["qtype"]
        key = label + "".join(f",{k}={v}" for k, v in opts.items() if k != "qtype")
        res[key] = {"bits_per_weight": round(8 * p.numel() / n, 4),
                    "decode_gbps_bf16_out": round(2 * n / ms / 1e6, 1)}
    return res


# --- the entropy-coded codec and strict bounds (issue 14) --------------------------------------

def _ans_same_bytes(ctx: Ctx, x: torch.Tensor, level: float, strict: int = 1):
    """Encode x with `ans` on the CPU; the Triton decode on the device and the numpy decode must
    write the same bytes. Returns the blob, or raises AssertionError."""
    from profiles.codecs import ans, ans_triton, encode
    from profiles.codecs.registry import payload_tensor

    n, dt = x.numel(), x.dtype
    b = encode(x, "ans", "meanabs", level, strict=strict)
    secs = ans.split(payload_tensor(b.payload), b.meta, n, dt)
    want = ans.decode_cpu(*secs, b.meta, n, b.abs_bound, dt)
    got = ans_triton.decode(*[t.to(ctx.dev) for t in secs], b.meta, n, b.abs_bound, dt)
    if not torch.equal(want.view(torch.uint8), got.cpu().view(torch.uint8)):
        raise AssertionError(f"ans decode differs: shape {tuple(x.shape)} {dt} level={level} "
                             f"strict={strict} classes={b.meta.get('classes', 1)}")
    return b


def check_ans_bytes(ctx: Ctx) -> dict:
    sizes = (1, 33, 1000, 3 * 16384 + 17) if ctx.dry else (1, 33, 1000, 3 * 16384 + 17, 1 << 22)
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
    cases = 0
    for n in sizes:
        for dt in dtypes if (n < 5000 or not ctx.dry) else (torch.bfloat16,):
            x = torch.from_numpy(weights(n, seed=n)) * (40 if dt != torch.float8_e4m3fn else 1)
            x = x.to(dt)
            levels = ((0.05, 1), (0.5, 0)) if ctx.dry else ((0.05, 1), (0.5, 1), (0.5, 0), (2.0, 1))
            for level, strict in levels:
                _ans_same_bytes(ctx, x, level, strict)
                cases += 1
    # per-class frequency tables: rows, and each matrix's columns, of different scales
    gen = torch.Generator().manual_seed(5)
    for shape, scale_shape, dt in (((512, 256), (512, 1), torch.bfloat16),
                                   ((4, 128, 256), (4, 1, 256), torch.float16)):
        x = (torch.randn(*shape, generator=gen) * 0.02
             * (0.2 + 3 * torch.rand(*scale_shape, generator=gen))).to(dt)
        for level in (0.5, 2.0):
            if _ans_same_bytes(ctx, x, level).meta.get("classes", 1) == 1:
                raise AssertionError(f"ans chose one table for {shape}: the class case is not run")
            cases += 1
    return {"cases": cases, "sizes": list(sizes)}


def check_szp_strict_patches(ctx: Ctx) -> dict:
    from profiles.codecs import decode, encode

    n = 40000 if ctx.dry else (1 << 24)
    x = (torch.from_numpy(weights(n, seed=9)) * 40).bfloat16().to(ctx.dev)
    out = {}
    for variant in ("fixed", "plain"):
        b = encode(x, "szp", "meanabs", 0.05, variant=variant)
        y_dev, y_cpu = decode(b, device=ctx.dev), decode(b, device="cpu")
        if not torch.equal(y_dev.cpu().view(torch.int16), y_cpu.view(torch.int16)):
            raise AssertionError(f"szp strict ({variant}): device and CPU decodes differ")
        err = float((y_cpu.double() - x.cpu().double()).abs().max())
        if err > b.abs_bound:
            raise AssertionError(f"szp strict ({variant}): max error {err} > bound {b.abs_bound}")
        out[variant] = {"patches": b.meta["patches"], "max_err_over_bound": round(err / b.abs_bound, 4)}
    return out


def check_ans_speed_1gib(ctx: Ctx) -> dict:
    from profiles.codecs import ans, ans_triton, encode
    from profiles.codecs.registry import payload_tensor

    n = (1 << 15) if ctx.dry else (1 << 29)           # 2^29 bf16 values = 1 GiB
    repeats = 1 if ctx.dry else 10
    gen = torch.Generator().manual_seed(0)
    # a [rows, 4096] matrix whose rows differ in scale as trained weights do, so the per-class
    # tables are in use (their extra look-up is part of the figure)
    rows = n // 4096
    x = (torch.randn(rows, 4096, generator=gen) * 0.02
         * (0.5 + torch.rand(rows, 1, generator=gen))).bfloat16()
    res = {"values": n, "bf16_bytes": 2 * n, "repeats": repeats, "shape": [rows, 4096],
           "timing": "perf_counter, dry run: figures meaningless" if ctx.dry
           else "median of CUDA events after one warm-up; encoded on the CPU (numpy reference)"}
    for label, mode, level in (("meanabs_0.5", "meanabs", 0.5), ("abs_1e-3", "abs", 1e-3)):
        t0 = time.perf_counter()
        b = encode(x, "ans", mode, level)
        row = {"ratio_vs_bf16": round(b.ratio, 4), "cpu_encode_s": round(time.perf_counter() - t0, 1),
               "classes": int(b.meta.get("classes", 1)), "class_axis": b.meta.get("axis")}
        secs = [t.to(ctx.dev) for t in ans.split(payload_tensor(b.payload), b.meta, n, torch.bfloat16)]
        for g in (1, 2, 4, 8):
            ans_triton.CHUNKS_PER_PROGRAM = g
            ms = _time_ms(ctx, lambda: ans_triton.decode(*secs, b.meta, n, b.abs_bound,
                                                         torch.bfloat16), repeats)
            row[f"decode_gbps_g{g}"] = round(2 * n / ms / 1e6, 1)
        ans_triton.CHUNKS_PER_PROGRAM = 4
        row["decode_gbps_best"] = max(v for k, v in row.items() if k.startswith("decode_gbps_g"))
        got = ans_triton.decode(*secs, b.meta, n, b.abs_bound, torch.bfloat16).cpu()
        want = ans.decode_cpu(*[t.cpu() for t in secs], b.meta, n, b.abs_bound, torch.bfloat16)
        row["bit_identical_to_cpu"] = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
        res[label] = row
    res["target_decode_gbps"] = 500
    res["meets_target"] = (not ctx.dry) and res["meanabs_0.5"]["decode_gbps_best"] >= 500
    if not all(res[k]["bit_identical_to_cpu"] for k in ("meanabs_0.5", "abs_1e-3")):
        res["status"] = "failed"
    return res


CHECKS = [("env", check_env), ("szp_triton_bytes", check_szp_triton_bytes),
          ("szp_torch_cuda_bytes", check_szp_torch_cuda_bytes),
          ("szp_large_agree", check_szp_large_agree),
          ("szp_decode_dtypes", check_szp_decode_dtypes), ("cuszp_bytes", check_cuszp_bytes),
          ("szp_speed_1gib", check_szp_speed_1gib),
          ("hardware_profile", check_hardware_profile),
          ("runtime_fidelity", check_runtime_fidelity),
          ("formats_triton_bytes", check_formats_triton_bytes),
          ("formats_speed_1gib", check_formats_speed_1gib),
          ("ans_bytes", check_ans_bytes), ("szp_strict_patches", check_szp_strict_patches),
          ("ans_speed_1gib", check_ans_speed_1gib)]


def main() -> int:
    ap = argparse.ArgumentParser(description="moesz GPU checks")
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="run everything small on the CPU")
    ap.add_argument("--only", default="", help="comma list of check names to run")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    ctx = Ctx(args.dry_run)
    ctx.out = args.out          # checks may write files (Perfetto traces) next to the JSON
    only = {s for s in args.only.split(",") if s}
    results = {"kind": "gpu_check", "schema_version": 1, "dry_run": args.dry_run,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checks": {}}
    failed = 0
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            detail = fn(ctx)
            status = detail.pop("status", "passed") if isinstance(detail, dict) else "passed"
        except Exception as exc:  # recorded, then the next check runs
            detail = {"error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-4000:]}
            status = "failed"
            failed += 1
        secs = round(time.perf_counter() - t0, 2)
        results["checks"][name] = {"status": status, "seconds": secs, **detail}
        print(f"{name:22s} {status:8s} {secs:7.2f}s  "
              f"{json.dumps({k: v for k, v in detail.items() if k != 'traceback'})[:300]}", flush=True)
        if ctx.dev.type == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out / "gpu_check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
