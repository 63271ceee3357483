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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe as machine_line  # noqa: E402

SIGMA = 0.02
CHUNK = 1 << 24  # values generated at a time
TARGETS = {"Mixtral-8x7B": 93e9, "DeepSeek-V3": 1.3e12}
HOST = 64e9


def disk_tensors(arch: str, overrides: dict) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    """On-disk (name, shape) of every tensor of a checkpoint of `arch`, as transformers 5 saves it
    (experts per expert), from a model built on the meta device; and the config dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    mixtral_like = arch in ("mixtral", "phimoe", "minimax")
    w = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral_like else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    out = []
    tied = getattr(config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if mixtral_like:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("experts.gate_up_proj"):
            stem, (e, rows, cols) = name[: -len("gate_up_proj")], t.shape
            for i in range(e):
                out.append((f"{stem}{i}.{w['gate']}.weight", (rows // 2, cols)))
                out.append((f"{stem}{i}.{w['up']}.weight", (rows // 2, cols)))
        elif name.endswith("experts.down_proj"):
            stem, (e, rows, cols) = name[: -len("down_proj")], t.shape
            out.extend((f"{stem}{i}.{w['down']}.weight", (rows, cols)) for i in range(e))
        else:
            out.append((name, tuple(t.shape)))
    return out, config.to_dict()


def random_bf16(n: int, rng: np.random.Generator, norm: bool):
    """n bf16 values (as uint16 bits) in pieces of CHUNK: ones for norms, N(0, SIGMA) otherwise."""
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        if norm:
            yield np.full(m, 0x3F80, dtype=np.uint16)  # 1.0
            continue
        v = (rng.standard_normal(m, dtype=np.float32) * SIGMA).view(np.uint32)
        yield ((v + 0x7FFF + ((v >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def write_checkpoint(out: Path, arch: str = "mixtral", layers: int = 2, shards: int = 4,
                     seed: int = 0, **overrides) -> int:
    """Write a random bf16 checkpoint of `arch` (its default, real widths) with `layers` decoder
    layers into `out` as `shards` safetensors files plus the index; memory stays at one piece.
    Returns the bytes of tensor data written."""
    from profiles.fileio import atomic_write_json, atomic_write_with
    from profiles.models.files import INDEX, TensorOut, write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    tensors, config = disk_tensors(arch, {"num_hidden_layers": layers, **overrides})
    config["dtype"] = "bfloat16"
    total = sum(2 * int(np.prod(s)) for _, s in tensors)
    per_shard, groups, cur, size = total / shards, [], [], 0
    for name, shape in tensors:
        cur.append((name, shape))
        size += 2 * int(np.prod(shape))
        if size >= per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        outs = [TensorOut(n, "BF16", s, lambda n=n, s=s: random_bf16(
            int(np.prod(s)), rng, "norm" in n)) for n, s in group]
        atomic_write_with(out / fname, lambda p, o=outs: write_safetensors(
            p, o, {"format": "pt"}))
        weight_map.update({n: fname for n, _ in group})
    atomic_write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", config)
    return total


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
    host = max(expert_bytes // 4, 1)
    return {
        "info": ["model", "info", str(ckpt)],
        "pack": ["pack", str(ckpt), "--uniform", "szp:meanabs:1", "--out", str(work / "packed")],
        "ratios": ["profile", "model", str(ckpt), "--out", str(work / "profile"),
                   "--ratios-only", "--codecs", "szp", "--levels", "1", "--ratio-sample", "2"],
        "eval": ["model", "eval", str(work / "packed"), "--limit", "5"],
        "run": ["run", str(work / "packed"), "--tokens", "4", "--host-mem", str(host)],
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
        size = write_checkpoint(ckpt, args.arch, args.layers, args.shards)
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
