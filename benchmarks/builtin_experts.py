"""How much the built-in model's accuracy depends on its routed experts, layer by layer.

Measures, on the `profile` split, the paired change of content accuracy (Newcombe interval, exact
McNemar p) when
  * all routed experts are zeroed,
  * one MoE layer's routed experts are zeroed (each layer in turn),
  * one MoE layer's routed experts go through a real `szp` round trip at a coarse bound,
and prints a markdown table (the README's table) plus a JSON file of every figure.

    python benchmarks/builtin_experts.py --limit 200 --level 2.0 --json-out benchmarks/builtin_experts.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout too

from profiles.evaluation import evaluate
from profiles.models import load_model
from profiles.models.restore import WeightRestorer
from profiles.policy import Policy, StorageSpec, apply_policy


@contextlib.contextmanager
def zeroed(loaded, layers):
    """Zero the routed experts of `layers`; restore the exact weights on exit."""
    restorer = WeightRestorer()
    try:
        for ref in loaded.expert_map.experts:
            if ref.layer in layers:
                for t in ref.tensors.values():
                    restorer.replace(t, torch.zeros_like(t))
        yield
    finally:
        restorer.restore()


def _row(label, result):
    cells = []
    for t in result.tasks:
        c = t.content_change.change
        cells.append(f"{c.value * 100:+.1f} [{c.low * 100:+.1f}, {c.high * 100:+.1f}]")
    return f"| {label} | " + " | ".join(cells) + " |"


def _record(label, result):
    return {"condition": label, "tasks": {
        t.task: {"content": t.content.to_dict(), "content_change": t.content_change.to_dict(),
                 "strict_change": t.strict_change.to_dict()} for t in result.tasks}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="prompts per task")
    ap.add_argument("--level", type=float, default=2.0, help="szp meanabs level (coarse bound)")
    ap.add_argument("--split", default="profile")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    loaded = load_model("builtin")
    layers = list(loaded.geometry.moe_layers)
    base = evaluate(loaded, split=args.split, limit=args.limit)
    tasks = [t.task for t in base.tasks]
    lines = ["| condition | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
             "| base accuracy (content) | " + " | ".join(
                 f"{t.content.value * 100:.1f} [{t.content.low * 100:.1f}, "
                 f"{t.content.high * 100:.1f}]" for t in base.tasks) + " |"]
    records = [{"condition": "base", "tasks": {t.task: {"content": t.content.to_dict()}
                                                for t in base.tasks}}]
    conditions = [("all routed experts zeroed", lambda: zeroed(loaded, set(layers)))]
    conditions += [(f"layer {l} experts zeroed", (lambda l=l: zeroed(loaded, {l}))) for l in layers]
    spec = StorageSpec("szp", "meanabs", args.level)
    conditions += [(f"layer {l} szp meanabs {args.level:g}",
                    (lambda l=l: apply_policy(loaded, Policy(fingerprint=loaded.fingerprint,
                                                             layers={l: spec}))))
                   for l in layers]
    for label, ctx in conditions:
        with ctx():
            res = evaluate(loaded, split=args.split, limit=args.limit, baseline=base,
                           condition=label)
        lines.append(_row(label, res))
        records.append(_record(label, res))
        print(lines[-1], flush=True)
    print()
    print(f"Measured {time.strftime('%Y-%m-%d')} on the `{args.split}` split, {args.limit} prompts "
          f"per task, greedy decoding, bf16 weights; content-accuracy change in points with 95 % "
          f"paired intervals (Newcombe); {time.time() - t0:.0f} s.")
    print("\n".join(lines))
    if args.json_out:
        from profiles.fileio import atomic_write_json

        atomic_write_json(args.json_out, {"split": args.split, "limit": args.limit,
                                          "szp_meanabs_level": args.level, "records": records})


if __name__ == "__main__":
    main()
