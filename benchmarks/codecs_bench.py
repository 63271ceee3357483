"""Codec figures for benchmarks/RESULTS.md (CPU): ratios against REFERENCE's size table and the
entropy bound, SZ3 predictors on weights, and szp torch throughput.

    python benchmarks/codecs_bench.py --out runs/codecs_bench.json          # 16 M values
    python benchmarks/codecs_bench.py --values 1048576 --repeats 2          # quick look

All figures are measured on the machine that runs it: ratios count every stored byte against bf16;
throughputs are MB/s (1e6 bytes) of bf16 input/output, median of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout too

from profiles.codecs import decode, encode, szp_torch
from profiles.fileio import atomic_write_json

# REFERENCE.md section 2, "Size model on Gaussian weights", ratio vs bf16 (fixed, plain)
REFERENCE_SZP = {1e-2: (4.92, 4.45), 3e-3: (3.34, 3.06), 1e-3: (2.55, 2.37),
                 3e-4: (1.98, 1.90), 1e-4: (1.68, 1.58)}
PREDICTORS = ("nopred", "lorenzo", "interp", "interp-lorenzo")


def gaussian_bf16(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.02).bfloat16()


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def entropy_ratio(x32: np.ndarray, eb: float) -> float:
    """bf16 bytes / (n * H / 8): the ratio an ideal entropy coder of the quantization codes reaches."""
    q = np.round(x32 / (2 * eb)).astype(np.int64)
    _, counts = np.unique(q, return_counts=True)
    p = counts / q.size
    bits = float(-(p * np.log2(p)).sum())
    return 16.0 / bits


def szp_ratios(x: torch.Tensor) -> list[dict]:
    rows = []
    for eb, (ref_fixed, ref_plain) in REFERENCE_SZP.items():
        for variant, ref in (("fixed", ref_fixed), ("plain", ref_plain)):
            blob = encode(x, "szp", "abs", eb, variant=variant)
            rows.append({"abs_bound": eb, "variant": variant, "ratio": round(blob.ratio, 4),
                         "reference": ref, "rel_diff": round(blob.ratio / ref - 1, 4)})
    return rows


def sz3_rows(x: torch.Tensor, repeats: int) -> list[dict]:
    x32 = x.float().numpy()
    rows = []
    for eb in (1e-2, 1e-3, 1e-4):
        ent = entropy_ratio(x32, eb)
        for pred in PREDICTORS if eb == 1e-3 else ("nopred",):
            holder = {}

            def enc():
                holder["b"] = encode(x, "sz3", "abs", eb, predictor=pred)

            te = median_s(enc, repeats)
            td = median_s(lambda: decode(holder["b"]), repeats)
            blob = holder["b"]
            rows.append({"abs_bound": eb, "predictor": pred, "ratio": round(blob.ratio, 4),
                         "entropy_ratio": round(ent, 4), "rel_to_entropy": round(blob.ratio / ent - 1, 4),
                         "encode_mbps": round(x.numel() * 2 / te / 1e6, 1),
                         "decode_mbps": round(x.numel() * 2 / td / 1e6, 1)})
    return rows


def szp_speed(x: torch.Tensor, repeats: int, threads: list[int]) -> list[dict]:
    eb = 1e-3
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        holder = {}

        def enc_core():
            holder["s"] = szp_torch.encode(x, eb)[0]

        out = torch.empty(x.numel(), dtype=torch.bfloat16)

        def dec_core():
            szp_torch.decode(holder["s"], x.numel(), eb, out=out, finish=lambda p: p.to(torch.bfloat16))

        def enc_api():
            holder["b"] = encode(x, "szp", "abs", eb)

        te, td = median_s(enc_core, repeats), median_s(dec_core, repeats)
        tea, tda = median_s(enc_api, repeats), median_s(lambda: decode(holder["b"]), repeats)
        mb = x.numel() * 2 / 1e6
        rows.append({"threads": nt, "encode_mbps": round(mb / te, 1), "decode_mbps": round(mb / td, 1),
                     "api_encode_mbps": round(mb / tea, 1), "api_decode_mbps": round(mb / tda, 1)})
    return rows


def baselines(x: torch.Tensor) -> list[dict]:
    out = []
    for codec in ("lossless", "rtn8", "rtn4", "raw"):
        blob = encode(x, codec)
        out.append({"codec": codec, "ratio": round(blob.ratio, 4),
                    "measured_max_err": blob.abs_bound})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma list of torch CPU thread counts")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    x = gaussian_bf16(args.values)
    threads = [int(t) for t in args.threads.split(",")]
    result = {
        "kind": "codecs_bench", "values": args.values, "dtype": "bf16", "sigma": 0.02,
        "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads default, "
                   f"cuda={torch.cuda.is_available()}",
        "szp_ratios_vs_reference": szp_ratios(x),
        "sz3_vs_entropy": sz3_rows(x, max(1, args.repeats // 2)),
        "szp_torch_cpu_speed": szp_speed(x, args.repeats, threads),
        "baselines": baselines(x),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
