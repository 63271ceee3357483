"""KL as the planner's workhorse: does per-layer KL add up, and how does it map to accuracy?

    python benchmarks/kl_bench.py additivity MODEL --text FILE [--level 1] [--codec szp]
    python benchmarks/kl_bench.py calibration PROFILE_DIR
    python benchmarks/kl_bench.py plans PROFILE_DIR --budgets content=0.01,kl=0.02 [--verify 3]

`additivity` applies `CODEC:meanabs:LEVEL` (real codec round trips) to each MoE layer alone, to
each third of the layers and to the whole model, and measures the next-token KL(base ||
perturbed) per sequence of the text's profile half (`profiles.evaluation.textmetrics`). For each
multi-layer policy it reports the measured KL, the sum of its layers' single-layer KLs and their
ratio, with a 95 % percentile bootstrap over sequences that resamples the same sequences for
numerator and denominator (the measurements are paired). Also the per-layer KL interval's
half-width over its point estimate.

`calibration` fits, on a profile with accuracy tasks and text metrics, the content-accuracy drop
(mean over tasks) against KL over every measured point, by weighted least squares through the
origin (weights: 1 / the drop's variance from its paired interval; standard error inflated by the
reduced chi-square when the points scatter more than their intervals): drop ~= beta * KL.

`plans` plans on the profile at each budget as the demo does (H200 preset, GPU budget 25 % of the
routed-expert bytes, 128 generated tokens), with `--verify` candidates measured, and validates
each plan on the held-out validate split: predicted tokens/s (simulation) of the plan, the best
uniform level that meets the budget and rtn8, and the plan's measured drop.

Prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402

B = 2000


def additivity(args) -> None:
    import torch

    from profiles.evaluation.textmetrics import per_sequence, read_text, text_reference
    from profiles.models import load_model
    from profiles.policy import Policy, StorageSpec, apply_policy
    from profiles.profiling.grid import parse_groups
    from profiles.profiling.steps import compute_view

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    # fp32 arithmetic on the checkpoint's (decoded) weights, as the profiler does on the CPU
    corpus = read_text(args.text, loaded.tokenizer, "profile", max_tokens=args.tokens,
                       model=loaded.model)
    ref = text_reference(compute_view(loaded, "fp32").model, corpus)
    layers = list(loaded.geometry.moe_layers)
    spec = StorageSpec(args.codec, "meanabs", args.level)

    def measure(on):
        pol = Policy(fingerprint=loaded.fingerprint, layers={lay: spec for lay in on})
        with apply_policy(loaded, pol, measure_bytes=False):
            return per_sequence(compute_view(loaded, "fp32").model, ref)["kl"]

    single = {lay: measure([lay]) for lay in layers}
    groups = dict(parse_groups("thirds", layers))
    groups["all"] = tuple(layers)
    n = np.array([len(t) for t in ref.targets], dtype=float)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(n), size=(B, len(n)))
    print(f"## KL additivity: {args.model}, {spec.describe()} ({date.today()})\n")
    print(f"Machine: {describe()}. Command: `python benchmarks/kl_bench.py additivity "
          f"{args.model} --text {args.text} --level {args.level:g} --codec {args.codec}`. "
          f"Text: {corpus.describe()}.\n")
    print("| layer | KL nats/token [95% bootstrap] | half-width / estimate |")
    print("|---|---|---|")
    for lay in layers:
        k = single[lay]
        v = k.sum() / n.sum()
        bs = k[idx].sum(1) / n[idx].sum(1)
        lo, hi = np.quantile(bs, [0.025, 0.975])
        print(f"| {lay} | {v:.4g} [{lo:.4g}, {hi:.4g}] | {(hi - lo) / 2 / v:.1%} |")
    print("\n| policy | layers | measured KL | sum of single-layer KLs | measured / sum "
          "[95% paired bootstrap] |")
    print("|---|---|---|---|---|")
    for name, ls in groups.items():
        meas = measure(ls)
        summed = sum(single[lay] for lay in ls)
        r = meas.sum() / summed.sum()
        rb = meas[idx].sum(1) / summed[idx].sum(1)
        lo, hi = np.quantile(rb, [0.025, 0.975])
        print(f"| {name} | {','.join(map(str, ls))} | {meas.sum() / n.sum():.4g} | "
              f"{summed.sum() / n.sum():.4g} | {r:.3f} [{lo:.3f}, {hi:.3f}] |")
    print(f"\n{len(layers) + len(groups)} policies measured in {time.perf_counter() - t0:.0f} s "
          f"(wall clock, one thread).")


def calibration(args) -> None:
    import pandas as pd

    from planner.calibration import calibration_points, fit_calibration

    s = pd.read_parquet(Path(args.profile) / "sensitivity.parquet")
    pts = calibration_points(s)
    cal = fit_calibration(s)
    print(f"## KL to accuracy calibration: {args.profile} ({date.today()})\n")
    print(f"Machine: {describe()}. Command: `python benchmarks/kl_bench.py calibration "
          f"{args.profile}`.\n")
    print("| point | storage | KL nats/token | content drop, pts [95%] |")
    print("|---|---|---|---|")
    for t, storage, k, d, sd in sorted(pts, key=lambda p: p[2]):
        print(f"| {t} | {storage} | {k:.4g} | {100 * d:+.2f} ± {100 * 1.96 * sd:.2f} |")
    b, se = cal.beta, cal.beta_se
    print(f"\ncontent drop = beta x KL, beta = {b:.3f} per nat (95% CI [{b - 1.96 * se:.3f}, "
          f"{b + 1.96 * se:.3f}]), reduced chi-square {cal.chi2_reduced:.2f}, {cal.points} "
          f"points: a KL of 0.01 nats/token implies a content drop of {b:.2f} "
          f"[{b - 1.96 * se:.2f}, {b + 1.96 * se:.2f}] points.")


def plans(args) -> None:
    import json

    from planner.budget import parse_budget
    from planner.pipeline import PlanRequest, make_plan
    from planner.validate import validate_plan
    from profiles.serving import ServingConfig, parse_mem

    serving = ServingConfig(generated_tokens=128, prompt_tokens=16).with_budgets(
        parse_mem("25%", what="GPU budget"), None)
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    print(f"## Planner on the user's metrics: {args.profile} ({date.today()})\n")
    print(f"Machine: {describe()}. Command: `python benchmarks/kl_bench.py plans {args.profile} "
          f"--budgets {args.budgets} --verify {args.verify}`; hardware preset:h200-published, "
          f"GPU budget 25 % of routed-expert bytes, batch 1, 128 tokens.\n")
    print("| budget | plan | plan tok/s (sim) | best uniform meeting it, tok/s | rtn8 tok/s "
          "(meets?) | plan's drop: predicted [95%] (kind) | measured on validate [95%] | "
          "verdict | plan + verify + validate s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in args.budgets.split(","):
        metric, value = parse_budget(b)
        t0 = time.perf_counter()
        req = PlanRequest(profile=args.profile, hardware="preset:h200-published", budget=value,
                          serving=serving, metric=metric, trials=150, warm_trials=20, seed=0,
                          verify=args.verify, command=f"kl_bench plans {b}")
        path = out / f"plan-{metric}-{value}.json"
        make_plan(req, out=str(path))
        val = validate_plan(path, cache_dir=out / "cache")
        wall = time.perf_counter() - t0
        doc = json.loads(path.read_text())
        p = doc["predicted"]
        base = {x["name"]: x for x in doc["baselines"]}
        uni = [x for n, x in base.items() if n.startswith("uniform") and x.get("meets_budget")
               and x.get("tokens_per_s")]
        best_u = max(uni, key=lambda x: x["tokens_per_s"], default=None)
        r8 = base.get("rtn8", {})
        d, m = p["accuracy_drop"], val["measured"]["accuracy_drop"]
        kind = "measured" if str(d.get("kind", "")).startswith("measured") else "predicted"
        layers = "; ".join(sorted({x["spec"] for x in doc["layers"]}))
        f = ".4g"
        print(f"| {b} | {p['source']}: {layers} | {p['tokens_per_s']:.1f} | "
              + (f"{best_u['name']} {best_u['tokens_per_s']:.1f}" if best_u else "none")
              + f" | {r8.get('tokens_per_s') or float('nan'):.1f} "
              f"({'yes' if r8.get('meets_budget') else 'no'}) | "
              f"{d['value']:{f}} [{d['low']:{f}}, {d['high']:{f}}] ({kind}) | "
              f"{m['value']:{f}} [{m['low']:{f}}, {m['high']:{f}}] | {val['verdict']} | "
              f"{wall:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("additivity")
    a.add_argument("model")
    a.add_argument("--text", required=True)
    a.add_argument("--level", type=float, default=1.0)
    a.add_argument("--codec", default="szp")
    a.add_argument("--tokens", type=int, default=None)
    c = sub.add_parser("calibration")
    c.add_argument("profile")
    p = sub.add_parser("plans")
    p.add_argument("profile")
    p.add_argument("--budgets", default="content=0.005,content=0.01,content=0.02")
    p.add_argument("--verify", type=int, default=3)
    p.add_argument("--work", default="kl-bench-plans")
    args = ap.parse_args()
    {"additivity": additivity, "calibration": calibration, "plans": plans}[args.cmd](args)


if __name__ == "__main__":
    main()
