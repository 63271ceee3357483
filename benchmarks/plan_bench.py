"""Planner benchmarks: DeepSeek-V3's geometry from a synthetic profile, and the built-in model.

    python benchmarks/plan_bench.py deepseek [--work DIR] [--budget 0.01] [--seeds 0,1,2]
    python benchmarks/plan_bench.py builtin --profile DIR [--gpu-mem 25%] [--budget 0.01]
    python benchmarks/plan_bench.py spaces [--presets olmoe-1b-7b,...] [--spec arch:...]
                                           [--profile DIR] [--seeds 0,1,2] [--trials N]

`deepseek` writes a synthetic model profile of `preset:deepseek-v3` (58 MoE layers x 8 levels;
ratios measured with the real szp codec on Gaussian weights of its shapes; sensitivities from a
seeded generator), then times `moesz plan` on it end to end (a fresh process, imports included)
and reports the MILP optimum, Optuna's cold-start gap to it and the trials it took, for each seed
and for both search spaces. `builtin` plans on a measured profile under a GPU budget that forces
misses and compares the plan with the best uniform level and rtn8 (closed form and simulation).
`spaces` compares the two search spaces (Lagrangian prices against one parameter per layer) by
their cold-start gap to the MILP optimum on synthetic profiles of several preset geometries (in
one process, through the library: the study alone is timed).
Prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402  (benchmarks/machine.py)


def _moesz(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "planner", *args], cwd=ROOT, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"moesz {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return wall, r.stdout


def deepseek(args) -> None:
    from planner.synthetic import write_synthetic_profile
    from profiles.models import resolve_geometry

    work = Path(args.work)
    prof = work / "deepseek-v3-synthetic"
    if not (prof / "profile.json").exists():
        t0 = time.perf_counter()
        write_synthetic_profile(resolve_geometry("preset:deepseek-v3"), prof, seed=0,
                                command="benchmarks/plan_bench.py deepseek")
        print(f"synthetic profile written in {time.perf_counter() - t0:.1f} s (measured)")
    print(f"## Planner\n\n{date.today().isoformat()}, {describe()}.\n")
    print("DeepSeek-V3 geometry (`preset:deepseek-v3`, 58 MoE layers x 256 experts, top-8), "
          "synthetic profile: 8 szp meanabs levels " "(0.05-1.5) + raw per layer, ratios measured "
          "with the real codec on Gaussian weights of its shapes, sensitivities from a seeded "
          "generator (labelled synthetic); hardware `preset:h200-published`; GPU budget "
          f"{args.gpu_mem} of the expert bytes; content budget {args.budget}; batch 1, 256 "
          f"tokens.\n")
    print("| seed | space | wall s (process) | plan s (library) | MILP tok/s | MILP solves, s | "
          "cold trials | cold best tok/s | gap to MILP | trials to <= 1 % | final tok/s (closed "
          "form / sim) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for space in args.spaces.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = work / f"plan-{space}-{seed}.json"
            cmd = ["plan", "--profile", str(prof), "--hardware", "preset:h200-published",
                   "--accuracy-budget", str(args.budget), "--gpu-mem", args.gpu_mem,
                   "--trials", str(args.trials), "--seed", str(seed), "--space", space,
                   "--rerank", str(args.rerank), "--no-plots", "--out", str(out)]
            wall, _ = _moesz(cmd)
            doc = json.loads(out.read_text())
            m, s, p = doc["milp"], doc["search"], doc["predicted"]
            cs = s["cold_start"]
            sim = p["tokens_per_s_simulation"]
            print(f"| {seed} | {space} | {wall:.1f} | {doc['timings_s']['total_s']:.1f} | "
                  f"{m['tokens_per_s']:.3f} | {m['solves']}, {m['wall_s']:.1f} | {cs['trials']} | "
                  f"{cs['best_tokens_per_s'] or float('nan'):.3f} | "
                  f"{_pct(cs['gap_to_milp'])} | "
                  f"{cs['trials_to_within_1pct'] or 'not reached'} | "
                  f"{p['tokens_per_s_closed_form']:.3f} / "
                  f"{'n/a' if sim is None else f'{sim:.3f}'} |")
    print(f"\nCommand: `moesz {' '.join(cmd)}` (per seed and space); "
          f"timings: {json.dumps(doc['timings_s'])} (last run).")
    print("\nBaselines of the last run (predicted, closed form):\n")
    _baselines(doc)


def _baselines(doc) -> None:
    print("| policy | tok/s closed form | tok/s simulation | drop [95 % CI] | upper bound | meets "
          "budget |")
    print("|---|---|---|---|---|---|")
    p = doc["predicted"]
    a = p["accuracy_drop"]
    print(f"| **plan** | {p['tokens_per_s_closed_form']:.3f} | "
          f"{_f(p['tokens_per_s_simulation'])} | {a['value']:+.4f} [{a['low']:+.4f}, "
          f"{a['high']:+.4f}] | {a['ucb']:.4f} | yes |")
    for b in doc["baselines"]:
        d = b["accuracy_drop"]
        drop = "n/a" if d is None else f"{d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        print(f"| {b['name']} | {_f(b['tokens_per_s'])} | {_f(b.get('tokens_per_s_simulation'))} "
              f"| {drop} | {'n/a' if d is None else format(d['ucb'], '.4f')} | "
              f"{'yes' if b['meets_budget'] else 'no'}"
              f"{' (' + b['note'] + ')' if b['note'] else ''} |")


def _pct(v) -> str:
    return "no feasible trial" if v is None else f"{v * 100:.2f} %"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def builtin(args) -> None:
    out = Path(args.work) / "plan-builtin.json"
    cmd = ["plan", "--profile", args.profile, "--hardware", "preset:h200-published",
           "--accuracy-budget", str(args.budget), "--gpu-mem", args.gpu_mem, "--trials",
           str(args.trials), "--simulate-baselines", "--out", str(out)]
    wall, _ = _moesz(cmd)
    doc = json.loads(out.read_text())
    print(f"\n### Built-in model, measured profile\n\n{date.today().isoformat()}, {describe()}; "
          f"`moesz {' '.join(cmd)}` ({wall:.1f} s).\n")
    _baselines(doc)
    p = doc["predicted"]
    for name in ("uniform szp", "rtn8"):
        b = next((x for x in doc["baselines"] if x["name"] == name), None)
        if b and b["tokens_per_s"]:
            ps, bs = p["tokens_per_s_simulation"], b.get("tokens_per_s_simulation")
            sim = f", {ps / bs:.3f}x (simulation)" if ps and bs else ""
            print(f"\nplan vs {name}: {p['tokens_per_s_closed_form'] / b['tokens_per_s']:.3f}x "
                  f"(closed form){sim}; {name} meets the budget: {b['meets_budget']}")


def spaces(args) -> None:
    import math

    import numpy as np

    from planner.pipeline import PlanRequest, make_plan
    from planner.search import PlanSearch, run_search
    from planner.synthetic import write_synthetic_profile
    from profiles.models import resolve_geometry
    from profiles.serving import ServingConfig, parse_mem

    serving = ServingConfig().with_budgets(parse_mem(args.gpu_mem), parse_mem(None))
    print(f"\n### Search spaces: cold-start gap to the MILP optimum\n\n{date.today().isoformat()}, "
          f"{describe()}; synthetic profiles (labelled synthetic), `preset:h200-published`, GPU "
          f"budget {args.gpu_mem}, content budget {args.budget}, {args.trials} cold-start trials, "
          f"TPE multivariate; `python benchmarks/plan_bench.py spaces`.\n")
    print("| geometry | MoE layers x choices | MILP tok/s | space | seed | best tok/s | gap | "
          "trials to <= 1 % | search s |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [(name, Path(args.work) / f"synthetic-{name}", f"preset:{name}")
             for name in args.presets.split(",") if name]
    cases += [(spec, Path(args.work) / ("synthetic-" + spec.replace(":", "-").replace(",", "-")
                                          .replace("=", "")), spec) for spec in args.spec]
    if args.profile:
        cases.append((f"{args.profile} (measured)", Path(args.profile), None))
    for preset, prof, spec in cases:
        if spec is not None and not (prof / "profile.json").exists():
            write_synthetic_profile(resolve_geometry(spec), prof, seed=0,
                                    command="benchmarks/plan_bench.py spaces")
        req = PlanRequest(profile=str(prof), hardware="preset:h200-published",
                          budget=args.budget, serving=serving, trials=1, warm_trials=0, rerank=0)
        out = make_plan(req)  # the table, the closed form and the certified MILP optimum
        table, cf, acc = out.table, out.closed_form, out.accuracy
        ref = float(cf.tokens_per_s_many(*table.inputs(np.asarray(out.milp.choice)))[0])
        shape = f"{len(table.moe_layers)} x {table.mu.shape[1]}"
        for space in ("auto", "lagrangian", "per-layer"):
            for seed in [int(s) for s in args.seeds.split(",")]:
                search = PlanSearch(table, cf, acc.constraint(args.budget), acc, space=space,
                                    seed=seed, study_name=f"{preset}-{space}-{seed}")
                shown_space = f"auto ({search.space})" if space == "auto" else space
                res = run_search(search, args.trials)
                best = res.best.tokens_per_s if res.best else math.nan
                gap = "no feasible trial" if res.best is None else f"{(1 - best / ref) * 100:.2f} %"
                shown = "—" if res.best is None else f"{best:.3f}"
                print(f"| {preset} | {shape} | {ref:.3f} | {shown_space} | {seed} | {shown} | {gap} | "
                      f"{res.trials_to_within(ref, 0.01) or 'not reached'} | {res.wall_s:.1f} |",
                      flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", choices=("deepseek", "builtin", "spaces"))
    ap.add_argument("--work", default="/tmp/moesz-plan-bench")
    ap.add_argument("--profile")
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--gpu-mem", default="10%")
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--rerank", type=int, default=2)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--spaces", default="lagrangian")
    ap.add_argument("--presets", default="olmoe-1b-7b,mixtral-8x7b,qwen3-30b-a3b,deepseek-v3")
    ap.add_argument("--spec", action="append", default=[],
                    help="spaces: another geometry spec (e.g. arch:mixtral,num_hidden_layers=8)")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.which == "deepseek":
        deepseek(args)
    elif args.which == "spaces":
        spaces(args)
    else:
        if not args.profile:
            raise SystemExit("builtin needs --profile DIR (moesz profile model builtin --out DIR)")
        builtin(args)


if __name__ == "__main__":
    main()
