"""Real checkpoints at their real size: time and peak memory of each moesz step against the size.

Writes a checkpoint of real expert width with bounded memory (default: Mixtral-8x7B's geometry —
hidden 4096, expert FFN 14336, 8 experts — cut to 2 decoder layers, random bf16 weights, 4 shards
in the on-disk layout transformers saves: `block_sparse_moe.experts.N.w1/w2/w3`), then runs each
step as its own process and reads that child's peak resident memory from
`resource.getrusage(RUSAGE_CHILDREN)`:

    python benchmarks/scale.py --out runs/scale            # write, then measure every step
    python benchmarks/scale.py --out runs/scale --steps info,pack

Each figure is printed as seconds and as a multiple of the checkpoint's size, and extrapolated to
Mixtral-8x7B (93 GB) and DeepSeek-V3 (1.3 TB) on a 64 GB host: a step whose peak memory is a
fixed amount (not a multiple) fits any checkpoint; one that grows with the checkpoint does not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe as machine_line  # noqa: E402
from profiles.models.random_checkpoint import write_random_checkpoint  # noqa: E402

TARGETS = {"Mixtral-8x7B": 93e9, "DeepSeek-V3": 1.3e12}
HOST = 64e9


# runs one command as its child and reports that child's peak RSS: a fresh parent per step, since
# RUSAGE_CHILDREN is the maximum over every child a process has waited for
_WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
         "file=sys.stderr); sys.exit(rc)")


def run_step(label: str, argv: list[str]) -> dict:
    """Run `moesz ARGV` as a child process; its wall time and peak RSS (measured)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAP, sys.executable, "-m", "planner.cli",
                           *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - t0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    peak_kb = next(int(x.split()[1]) for x in reversed(lines) if x.startswith("PEAK_RSS_KB"))
    tail = [x for x in lines if not x.startswith("PEAK_RSS_KB")][-3:]
    return {"step": label, "argv": argv, "rc": proc.returncode, "seconds": seconds,
            "peak_rss_bytes": peak_kb * 1024, "tail": tail}


def steps(ckpt: Path, work: Path, expert_bytes: int) -> dict[str, list[str]]:
    host = max(expert_bytes // 16, 1)  # below the packed experts (szp ratio ~6): disk reads
    return {
        "info": ["model", "info", str(ckpt)],
        "pack": ["pack", str(ckpt), "--uniform", "szp:meanabs:1", "--out", str(work / "packed")],
        "ratios": ["profile", "model", str(ckpt), "--out", str(work / "profile"),
                   "--ratios-only", "--codecs", "szp", "--levels", "1", "--ratio-sample", "2"],
        "eval": ["model", "eval", str(work / "packed"), "--limit", "5", "--host-mem", str(host)],
        "run": ["run", str(work / "packed"), "--tokens", "4", "--host-mem", str(host),
                "--gpu-mem", "2GiB"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    ap.add_argument("--arch", default="mixtral")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--steps", default="info,pack,ratios,eval,run")
    ap.add_argument("--reuse", action="store_true", help="Keep an existing checkpoint in --out.")
    args = ap.parse_args(argv)
    ckpt, work = args.out / "checkpoint", args.out / "work"
    if not (args.reuse and (ckpt / "config.json").exists()):
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = write_random_checkpoint(ckpt, args.arch, args.layers, args.shards)
        print(f"wrote {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s "
              f"(writer peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} "
              f"GB, {before / 2**20:.2f} GB before)")
    from profiles.models import resolve_geometry

    g = resolve_geometry(str(ckpt))
    size = g.total_bytes
    print(machine_line())
    print(f"checkpoint: {ckpt} {args.arch} {args.layers} layers, {size / 1e9:.2f} GB of tensors, "
          f"{g.bytes_per_expert / 1e6:.1f} MB per expert")
    results = []
    for label in args.steps.split(","):
        r = run_step(label, steps(ckpt, work, g.routed_expert_bytes)[label])
        r["rss_over_checkpoint"] = r["peak_rss_bytes"] / size
        results.append(r)
        print(f"{label:7s} rc={r['rc']} {r['seconds']:7.1f} s  peak RSS "
              f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB = {r['rss_over_checkpoint']:.3f}x the "
              f"checkpoint  | {' / '.join(r['tail'])[:160]}")
    (args.out / "scale.json").write_text(json.dumps(
        {"machine": machine_line(), "checkpoint_bytes": size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
