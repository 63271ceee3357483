"""Per-matrix sensitivity and ratios of a model profile made with `--per-matrix` (issue 17).

    python benchmarks/matrix_bench.py sensitivity PROFILE_DIR
        per layer and level: the content change (points, mean over tasks, 95 % paired interval)
        and KL (nats per token, 95 % bootstrap interval) of perturbing only one matrix kind
        (those the profile has: gate_up, gate, up, down) and the whole expert; then the
        compression ratio of each matrix kind (measured)
    python benchmarks/matrix_bench.py bytes DIR HIDDEN INTER EXPERTS
        a random-weight Mixtral-shaped checkpoint packed under a per-matrix policy, against the
        simulator's predicted stored bytes
    python benchmarks/matrix_bench.py plans PLAN.json [PLAN.json ...] [--validation V.json ...]
        predicted tokens/s, stored expert bytes and the drop of each plan (and the measured drop
        of its validation file, in the same order)

Prints markdown tables for benchmarks/RESULTS.md, with the machine line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402


def sensitivity(profile_dir: str) -> None:
    from profiles.profiling import read_profile
    from profiles.profiling.sensitivity import mean_change_interval

    prof = read_profile(profile_dir)
    s = prof.sensitivity
    s = s[(s.target_kind == "layer") & (s.surrogate == "none") & s.level.notna()]
    print(f"machine: {describe()}")
    print(f"profile: {prof.path} ({prof.doc['command']}; {prof.doc['prompts_per_task']} prompts "
          f"per task x {len(prof.doc['tasks'])} tasks, split {prof.doc['split']})\n")
    kinds = [k for k in ("gate_up", "gate", "up", "down") if k in set(s.matrix)] + ["all"]
    names = [f"{k} only" if k != "all" else "whole expert" for k in kinds]
    print("| layer | level | " + " | ".join(f"content Δ {n}" for n in names) + " | "
          + " | ".join(f"KL {n}" for n in names) + " |")
    print("|---|---|" + "---|" * (2 * len(kinds)))
    for (target, level), grp in s.groupby(["target", "level"], sort=True):
        cells, kls = [], []
        for m in kinds:
            g = grp[grp.matrix == m]
            if len(g) == 0:
                cells.append("n/a")
                kls.append("n/a")
                continue
            c = mean_change_interval(list(zip(g.content_change, g.content_change_low,
                                              g.content_change_high)))
            cells.append(f"{100 * c[0]:+.2f} [{100 * c[1]:+.2f}, {100 * c[2]:+.2f}]")
            kl = g.kl_nats.mean()
            if "kl_low" in g.columns and g.kl_low.notna().any():
                kls.append(f"{kl:.4f} [{g.kl_low.mean():.4f}, {g.kl_high.mean():.4f}]")
            else:
                kls.append(f"{kl:.4f}")
        print(f"| {target.split(':')[1]} | {level:g} | " + " | ".join(cells + kls) + " |")
    r = prof.ratios
    r = r[(r.codec.isin(s.codec.unique())) & r.level.notna()]
    rkinds = [k for k in ("gate_up", "gate", "up", "down") if k in set(r.matrix)] + ["all"]
    print("\n| level | " + " | ".join(f"ratio {k} (mean over layers [min, max])" if k != "all"
                                     else "ratio whole expert" for k in rkinds) + " |")
    print("|---|" + "---|" * len(rkinds))
    for level, grp in r.groupby("level", sort=True):
        cells = []
        for m in rkinds:
            g = grp[grp.matrix == m]
            cells.append("n/a" if len(g) == 0 else
                         f"{g.ratio.mean():.3f} [{g.ratio.min():.3f}, {g.ratio.max():.3f}]")
        print(f"| {level:g} | " + " | ".join(cells) + " |")


def plans(args: list[str]) -> None:
    files, validations = [], []
    target = files
    for a in args:
        if a == "--validation":
            target = validations
            continue
        target.append(a)
    print(f"machine: {describe()}\n")
    print("| plan | per-matrix layers | tok/s predicted (closed form) | tok/s simulated | stored "
          "expert bytes (predicted) | drop predicted [95%] | drop measured on validate [95%] |")
    print("|---|---|---|---|---|---|---|")
    for i, f in enumerate(files):
        doc = json.loads(Path(f).read_text())
        p = doc["predicted"]
        d = p["accuracy_drop"]
        per = sum(1 for x in doc["layers"] if ";" in x["spec"])
        stored = p["host_bytes"]   # every routed expert as the plan stores it (predicted)
        measured = "n/a"
        if i < len(validations):
            v = json.loads(Path(validations[i]).read_text())["measured"]
            m = v["accuracy_drop"]
            measured = (f"{100 * m['value']:+.2f} [{100 * m['low']:+.2f}, "
                        f"{100 * m['high']:+.2f}] pts; stored {v['stored_bytes']:,} B measured "
                        f"(ratio {v['ratio']:.2f})")
        tps_sim = p.get("tokens_per_s_simulation")
        print(f"| {f} | {per}/{len(doc['layers'])} | {p['tokens_per_s_closed_form']:.1f} | "
              f"{'n/a' if tps_sim is None else f'{tps_sim:.1f}'} | {stored:,.0f} | "
              f"{100 * d['value']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] pts "
              f"({d.get('kind', 'predicted')}) | {measured} |")
        for x in doc["layers"]:
            print(f"|   layer {x['layer']} | {x['spec']} | | | {x['stored_bytes_per_expert']:,.0f} "
                  f"per expert | | |")


def bytes_side(out_dir: str, hidden: int, inter: int, experts: int) -> None:
    """A random-weight Mixtral-shaped checkpoint: a per-matrix policy (gate_up szp:1, down szp:3)
    packed for real, against the simulator's stored bytes from the checkpoint's own per-matrix
    ratios (`profile model --ratios-only --per-matrix`) and from synthetic ratios."""
    import time

    from profiles.hardware import load_hardware
    from profiles.models.random_checkpoint import write_random_checkpoint
    from profiles.packed import pack
    from profiles.policy import Policy, StorageSpec
    from profiles.profiling import ProfileRequest
    from profiles.profiling.profiler import profile_ratios
    from profiles.serving import ServingConfig
    from sim.costs import build_costs
    from sim.ratios import RatioTable, SyntheticRatios

    out = Path(out_dir)
    ckpt = out / "ckpt"
    if not (ckpt / "config.json").exists():
        write_random_checkpoint(ckpt, "mixtral", layers=1, shards=1, hidden_size=hidden,
                                intermediate_size=inter, num_local_experts=experts,
                                num_attention_heads=8, num_key_value_heads=8)
    policy = Policy(default=StorageSpec.parse("szp:meanabs:1"),
                    matrices={(None, None, "down"): StorageSpec.parse("szp:meanabs:3")})
    t = time.perf_counter()
    packed = pack(str(ckpt), policy, out / "packed")
    pack_s = time.perf_counter() - t
    frame, ratio_s = profile_ratios(ProfileRequest(model=str(ckpt), out=out / "prof",
                                                   codecs="szp", levels="1,3", per_matrix=True,
                                                   ratio_sample=experts))
    g = packed.geometry
    hw, sv = load_hardware("preset:h200-published"), ServingConfig(gpu_mem_fraction=0.25)
    rows = []
    whole = frame[frame.matrix == "all"]
    for name, ratios in (("profile's per-matrix ratios", RatioTable(frame, "ratios")),
                         ("the whole expert's ratio for each matrix's spec (a profile without "
                          "per-matrix rows)", RatioTable(whole, "ratios")),
                         ("synthetic ratios (Gaussian weights)", SyntheticRatios())):
        costs = build_costs(g, policy, hw, sv, ratios)
        rows.append((name, int(costs.stored_bytes.sum())))
    print(f"machine: {describe()}")
    print(f"random mixtral-shaped checkpoint: hidden {hidden}, expert width {inter}, {experts} "
          f"experts x 1 MoE layer, bf16 ({g.bytes_per_expert:,} B an expert); policy gate_up "
          f"szp:meanabs:1, down szp:meanabs:3; pack {pack_s:.1f} s, ratios {ratio_s:.1f} s wall\n")
    print("| stored expert bytes | bytes | vs packed |")
    print("|---|---|---|")
    measured = packed.stored_expert_bytes
    print(f"| packed (measured, `moesz pack`) | {measured:,} | 1 |")
    for name, b in rows:
        print(f"| predicted by the simulator, {name} | {b:,} | {b / measured:.4f} |")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "sensitivity":
        sensitivity(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "plans":
        plans(sys.argv[2:])
    elif len(sys.argv) == 6 and sys.argv[1] == "bytes":
        bytes_side(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(__doc__)
