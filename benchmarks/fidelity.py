"""The simulator checked against real runs on this machine: measured vs predicted decode tokens/s.

For each model (the built-in one and two larger geometries with random weights whose experts are
3 and 7 MB), the script measures this machine once (`measure_hardware`: host, the CPU as the
runtime's device, disk curve by size and depth), calibrates it on the model's own runtime runs
(`runtime_calibration`: all-hit and cold runs of raw experts, batch 1 and 4), packs the model
under each policy, then runs a grid of configurations with the real runtime on the CPU and
predicts each with the simulator fed the run's routing and sizes (`sim.replay.predict_for_run`);
each configuration is measured `--repeats` times and the median run is compared:

    python benchmarks/fidelity.py --out runs/fidelity                  # the whole grid
    python benchmarks/fidelity.py --out runs/fidelity --quick          # a smoke test (minutes)
    python benchmarks/fidelity.py --out runs/fidelity --models builtin
    python benchmarks/fidelity.py --out runs/fidelity-gpu --device cuda    # on a GPU machine

Grid, per model: policies raw / szp / sz3 / gq (4 bit, group 64) at GPU budgets of 10, 25 and
50 % of the routed-expert bytes; at 25 %, host budgets that force disk reads (10 % of the
original expert bytes) with 1 read in flight and the measured best depth; static-hot instead
of LRU; oracle prefetch; batch 4. Calibration runs (raw, 25 %, batch 1 and 4, all-hit and cold;
`sz3` and `szp` meanabs 1, 25 %, batch 1, cold; raw from disk, host 10 %, the best depth) overlap
those grid rows, which are therefore in-sample; every other row is out of sample.

Writes OUT/fidelity.json (every row with measured and predicted figures) and prints the markdown
table and summary for benchmarks/RESULTS.md. Each row's error is (predicted - measured) /
measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe as machine_line  # noqa: E402

MODELS = {
    "builtin": "builtin",
    "qwen3_moe 3 MB experts": "arch:qwen3_moe,hidden_size=1024,moe_intermediate_size=512,"
                              "num_hidden_layers=4,num_experts=16,num_experts_per_tok=4,"
                              "num_attention_heads=8,num_key_value_heads=4,head_dim=64,"
                              "vocab_size=1000",
    "olmoe 7 MB experts": "arch:olmoe,hidden_size=1536,intermediate_size=768,num_hidden_layers=3,"
                          "num_experts=16,num_experts_per_tok=4,num_attention_heads=12,"
                          "num_key_value_heads=12,vocab_size=1000",
}
POLICIES = {"raw": ("raw", None, None, {}), "szp": ("szp", "meanabs", 1.0, {}),
            "sz3": ("sz3", "meanabs", 1.0, {}), "gq": ("gq", None, None, {"bits": 4, "group": 64})}


def grid(best_depth: int, quick: bool) -> list[dict]:
    """The configurations of one model: label, policy, serving overrides."""
    rows = []
    policies = ("raw", "szp") if quick else tuple(POLICIES)
    budgets = (0.25,) if quick else (0.10, 0.25, 0.50)
    for pol in policies:
        for gb in budgets:
            rows.append({"policy": pol, "gpu": gb})
    for pol in (("raw", "szp") if quick else ("raw", "szp", "sz3")):
        for depth in sorted({1, best_depth}):
            rows.append({"policy": pol, "gpu": 0.25, "host": 0.1, "depth": depth})
    if not quick:
        for pol in ("raw", "szp"):
            rows.append({"policy": pol, "gpu": 0.25, "cache": "static-hot"})
            rows.append({"policy": pol, "gpu": 0.25, "prefetch": "oracle"})
            rows.append({"policy": pol, "gpu": 0.25, "batch": 4})
    return rows


def in_sample(cfg: dict, best_depth: int) -> bool:
    """Whether the calibration ran this configuration itself (`runtime_calibration`: raw at
    batch 1 and 4, `sz3` and `szp` at batch 1, all at a 25 % GPU budget; raw from disk with a 10 %
    host budget at the best depth)."""
    rest = {k: v for k, v in cfg.items() if k not in ("policy", "gpu")}
    if cfg["gpu"] != 0.25:
        return False
    return (not rest and cfg["policy"] in ("raw", "sz3", "szp")
            or rest == {"batch": 4} and cfg["policy"] == "raw"
            or rest == {"host": 0.1, "depth": best_depth} and cfg["policy"] == "raw")


def describe(cfg: dict) -> str:
    parts = [cfg["policy"], f"GPU {cfg['gpu']:.0%}"]
    if "host" in cfg:
        parts.append(f"host {cfg['host']:.0%} (disk, depth {cfg['depth']})")
    for key in ("cache", "prefetch"):
        if key in cfg:
            parts.append(cfg[key])
    if cfg.get("batch", 1) != 1:
        parts.append(f"batch {cfg['batch']}")
    return ", ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per run")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measured runs per configuration; the median one is compared")
    ap.add_argument("--quick", action="store_true", help="a smoke test: few rows, small profile")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the runtime runs (cuda: the same grid on a GPU, its profile "
                         "measured with the GPU section)")
    args = ap.parse_args()

    import torch

    from profiles.hardware import save_hardware
    from profiles.hardware.measure import measure_hardware
    from profiles.hardware.timings import model_timings
    from profiles.packed import pack
    from profiles.policy import Policy
    from profiles.runtime import measure_throughput
    from profiles.runtime.calibrate import runtime_calibration
    from profiles.runtime.random_model import is_geometry_spec, random_model
    from profiles.models import load_model
    from profiles.serving import ServingConfig
    from sim.replay import predict_for_run, relative_error

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {list(MODELS)}", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_line()
    print(f"# machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    t0 = time.perf_counter()
    base = measure_hardware(None, disk_dir=out, quick=args.quick, gpu=args.device == "cuda",
                            command="benchmarks/fidelity.py")
    save_hardware(base, out / "hardware.json")
    print(f"# measured the host and the CPU device in {time.perf_counter() - t0:.0f} s; disk best "
          f"depth {base.host.disk_depth}", flush=True)
    rows, disk_rows = [], []
    for label in names:
        spec = MODELS[label]
        t1 = time.perf_counter()
        lm = random_model(spec, "cpu") if is_geometry_spec(spec) else load_model(spec)
        g = lm.geometry
        hw = replace(base, model_timings=(model_timings(g, base.host, None, {},
                                                        quick=args.quick),))
        hw, samples = runtime_calibration(lm, hw, device=args.device,
                                          tokens=8 if args.quick else args.tokens,
                                          batches=(1,) if args.quick else (1, 4), disk_dir=out)
        hw = replace(hw, raw={**hw.raw, "runtime_calibration": samples})
        slug = label.split()[0]
        save_hardware(hw, out / f"hardware-{slug}.json")
        packed = {}
        configs = grid(hw.host.disk_depth, args.quick)
        for pol in sorted({c["policy"] for c in configs}):
            codec, mode, level, opts = POLICIES[pol]
            packed[pol] = pack(lm, Policy.uniform(codec, mode, level, lm.fingerprint, **opts),
                               out / f"{slug}-{pol}").path
        print(f"# {label}: calibrated and packed in {time.perf_counter() - t1:.0f} s "
              f"({g.bytes_per_expert / 2**20:.2f} MiB experts)", flush=True)
        for cfg in configs:
            sv = ServingConfig(gpu_mem_fraction=cfg["gpu"], host_mem_fraction=cfg.get("host"),
                               cache_policy=cfg.get("cache", "lru"),
                               prefetch=cfg.get("prefetch", "none"), batch_size=cfg.get("batch", 1),
                               prompt_tokens=16, generated_tokens=8 if args.quick else args.tokens,
                               disk_depth=cfg.get("depth"))
            runs = sorted((measure_throughput(packed[cfg["policy"]], None, sv,
                                              device=args.device)
                           for _ in range(max(1, args.repeats))), key=lambda x: x.tokens_per_s)
            r = runs[len(runs) // 2]
            p = predict_for_run(r, hw).result
            row = {"model": label, "config": describe(cfg), **cfg,
                   "in_sample": in_sample(cfg, hw.host.disk_depth),
                   "measured_tokens_per_s": r.tokens_per_s,
                   "measured_range": [runs[0].tokens_per_s, runs[-1].tokens_per_s],
                   "predicted_tokens_per_s":
                   p.tokens_per_s, "error": relative_error(p.tokens_per_s, r.tokens_per_s),
                   "measured_tpot_ms": r.tpot_s * 1e3, "predicted_tpot_ms": p.tpot_s * 1e3,
                   "measured_hit_rate": r.hit_rate, "predicted_hit_rate": p.hit_rate,
                   "measured_bytes_disk": r.bytes_disk, "predicted_bytes_disk": p.bytes_ssd,
                   "measured_bytes_h2d": r.bytes_h2d, "predicted_bytes_h2d": p.bytes_h2d,
                   "measured_disk_busy": r.disk_busy_fraction,
                   "predicted_disk_busy": p.disk_busy_fraction,
                   "disk_read_gbps": (r.bytes_disk / (r.disk_busy_fraction * r.time_s) / 1e9
                                      if r.disk_busy_fraction > 0 else None)}
            rows.append(row)
            print(f"{label:24s} {row['config']:42s} measured {r.tokens_per_s:8.2f} tok/s  "
                  f"predicted {p.tokens_per_s:8.2f}  error {row['error']:+.1%}", flush=True)
        # the runtime's disk-tier read speed against the measured curve, by read method
        rec = int(g.bytes_per_expert)
        depth = hw.host.disk_depth
        curve = hw.host.disk_curve
        sv = ServingConfig(gpu_mem_fraction=0.25, host_mem_fraction=0.1, prompt_tokens=16,
                           generated_tokens=8 if args.quick else args.tokens, disk_depth=depth)
        for method in ("direct", "fadvise", "cached"):
            r = measure_throughput(packed["raw"], None, sv, device=args.device,
                                   read_method=method)
            busy = r.disk_busy_fraction * r.time_s
            disk_rows.append({"model": label, "method": method, "depth": depth,
                              "record_bytes": rec, "bytes": r.bytes_disk, "reads": r.disk_reads,
                              "gbps_while_reading": r.bytes_disk / busy / 1e9 if busy else None,
                              "curve_gbps": curve.aggregate_gbps(rec, depth),
                              "curve_with_check_gbps": depth * rec / hw.host.disk_record_s(
                                  rec, depth) / 1e9,
                              "tokens_per_s": r.tokens_per_s})
        (out / "fidelity.json").write_text(json.dumps({"machine": machine, "rows": rows,
                                                       "disk": disk_rows}, indent=2))
        del lm
    print_report(rows, machine)
    print()
    print("| model | read method | reads in flight | record | GB/s while reading and checking "
          "(runtime) | curve GB/s at that size and depth | with the CRC32 check | tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for d in disk_rows:
        got = "n/a" if d["gbps_while_reading"] is None else f"{d['gbps_while_reading']:.2f}"
        print(f"| {d['model']} | {d['method']} | {d['depth']} | {d['record_bytes'] / 2**20:.2f} "
              f"MiB | {got} | {d['curve_gbps']:.2f} | {d['curve_with_check_gbps']:.2f} | "
              f"{d['tokens_per_s']:.2f} |")
    curve = base.host.disk_curve
    print()
    print("| read size | " + " | ".join(f"{d} in flight" for d in curve.depths) + " |")
    print("|---|" + "---|" * len(curve.depths))
    for size, row in zip(curve.sizes, curve.gbps):
        print(f"| {size / 1024:g} KiB | " + " | ".join(f"{v:.2f} GB/s" for v in row) + " |")
    print(f"best depth {curve.best_depth} ({curve.method}); depth-1 line fit "
          f"{base.host.disk_read.latency_s * 1e6:.0f} us + bytes / {base.host.disk_read.gbps:.2f} "
          f"GB/s, fit error {base.host.disk_read.fit_rel_error:.0%}")
    return 0


def print_report(rows: list[dict], machine: str) -> None:
    errs = [abs(r["error"]) for r in rows]
    out_of = [abs(r["error"]) for r in rows if not r["in_sample"]]
    print()
    print("| model | configuration | tok/s measured (median, range) | tok/s predicted | error | "
          "hit rate m / p | disk MB m / p |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        disk = (f"{r['measured_bytes_disk'] / 1e6:.1f} / {r['predicted_bytes_disk'] / 1e6:.1f}"
                if r.get("host") else "—")
        mark = " (in sample)" if r["in_sample"] else ""
        lo, hi = r["measured_range"]
        print(f"| {r['model']} | {r['config']}{mark} | {r['measured_tokens_per_s']:.2f} "
              f"({lo:.1f}–{hi:.1f}) | "
              f"{r['predicted_tokens_per_s']:.2f} | {r['error']:+.1%} | "
              f"{r['measured_hit_rate']:.3f} / {r['predicted_hit_rate']:.3f} | {disk} |")
    print()
    print(f"{len(rows)} runs on {machine}: median |error| {statistics.median(errs):.1%}, worst "
          f"{max(errs):.1%}; out of sample ({len(out_of)} runs): median "
          f"{statistics.median(out_of) if out_of else float('nan'):.1%}, worst "
          f"{max(out_of) if out_of else float('nan'):.1%}")
    for model in dict.fromkeys(r["model"] for r in rows):
        for pol in ("szp", "sz3"):
            def tps(policy, depth_rows):
                return [r for r in depth_rows if r["policy"] == policy]
            disk = [r for r in rows if r["model"] == model and r.get("host")]
            for depth in sorted({r["depth"] for r in disk}):
                at = [r for r in disk if r["depth"] == depth]
                raw, comp = tps("raw", at), tps(pol, at)
                if raw and comp:
                    m = comp[0]["measured_tokens_per_s"] / raw[0]["measured_tokens_per_s"]
                    p = comp[0]["predicted_tokens_per_s"] / raw[0]["predicted_tokens_per_s"]
                    print(f"disk tier binding, {model}, depth {depth}: {pol} vs raw speedup "
                          f"measured {m:.2f}x, predicted {p:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
