"""The formats users run (gq, NF4, MXFP4, GGUF k-quants, Q8_0, rtn) measured by moesz's own codecs
on real weights, beside the error-bounded codecs at the same RMSE (REFERENCE.md section 8).

    python benchmarks/formats_bench.py --out runs/formats_builtin.json     # built-in experts
    python benchmarks/formats_bench.py --input model.safetensors \\
        --match 'encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense\\.weight' \\
        --out runs/formats_minilm.json

Every tensor is cast to bf16 first. Per format, over all selected tensors pooled:
- bits/weight: the format's stored bytes (blob payloads) x 8 / weights; the moesz blob header
  (about 300 bytes per tensor) is reported separately;
- RMSE and max error of the decode (bf16, the original dtype) against the bf16 weights;
- `sz3` and `szp` bits/weight at that RMSE: both are swept over absolute bounds, and bits/weight is
  interpolated linearly in log(RMSE) between the two sweep points around the format's RMSE;
- CPU encode and decode MB/s of bf16 weights (sum over tensors, one timed run after a warm-up on
  the first tensor; measured on whatever load the machine has).
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout too

from profiles.codecs import decode, encode  # noqa: E402
from profiles.fileio import atomic_write_json  # noqa: E402

BUILTIN = Path(__file__).resolve().parent.parent / "profiles" / "builtin" / "model.safetensors"
EXPERTS = r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$"
# (label, codec, options), in the order of REFERENCE.md section 8
FORMATS = [
    ("Q2_K", "q2_k", {}),
    ("gq 2-bit, group 64", "gq", {"bits": 2, "group": 64}),
    ("Q3_K", "q3_k", {}),
    ("gq 3-bit, group 64", "gq", {"bits": 3, "group": 64}),
    ("NF4 b64, double-quant (bitsandbytes default)", "nf4", {"dq": True}),
    ("MXFP4, OCP rule (spec 6.3: floor, clamp)", "mxfp4", {"scale": "ocp"}),
    ("MXFP4, llama.cpp rule", "mxfp4", {"scale": "llamacpp"}),
    ("MXFP4, ceil rule (no clamping)", "mxfp4", {"scale": "ceil"}),
    ("gq 4-bit, group 64 (fp16 scale + zero)", "gq", {"bits": 4, "group": 64}),
    ("Q4_K", "q4_k", {}),
    ("Q5_K", "q5_k", {}),
    ("Q6_K", "q6_k", {}),
    ("gq 8-bit, group 64", "gq", {"bits": 8, "group": 64}),
    ("Q8_0", "q8_0", {}),
    ("moesz rtn4 (per-row absmax)", "rtn4", {}),
    ("moesz rtn8 (per-row absmax)", "rtn8", {}),
]
SWEEP = [3e-5, 6e-5, 1e-4, 2e-4, 4e-4, 7e-4, 1.2e-3, 2e-3, 3.5e-3, 6e-3, 1e-2, 1.7e-2, 3e-2,
         5e-2, 8e-2, 1.3e-1]


def load(path: Path, pattern: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    rx = re.compile(pattern)
    tensors = load_file(str(path))
    out = [(k, v.to(torch.bfloat16).contiguous()) for k, v in sorted(tensors.items())
           if rx.search(k)]
    if not out:
        raise SystemExit(f"{path}: no tensor matches {pattern!r}")
    return out


def measure(tensors, codec: str, mode=None, level=None, **opts) -> dict:
    """Pooled bits/weight, RMSE, max error and CPU MB/s of one codec setting over all tensors."""
    encode(tensors[0][1], codec, mode, level, **opts)               # warm-up (imports, caches)
    n = sum(t.numel() for _, t in tensors)
    payload = header = 0
    sq, mx, enc_s, dec_s = 0.0, 0.0, 0.0, 0.0
    for _, t in tensors:
        t0 = time.perf_counter()
        blob = encode(t, codec, mode, level, **opts)
        t1 = time.perf_counter()
        y = decode(blob)
        t2 = time.perf_counter()
        enc_s += t1 - t0
        dec_s += t2 - t1
        payload += blob.payload_nbytes
        header += blob.header_nbytes
        err = y.to(torch.float64) - t.to(torch.float64)
        sq += float((err * err).sum())
        mx = max(mx, float(err.abs().max()))
    mb = 2 * n / 1e6
    return {"bits_per_weight": 8 * payload / n, "header_bits_per_weight": 8 * header / n,
            "rmse": math.sqrt(sq / n), "max_err": mx, "encode_mbps": mb / enc_s,
            "decode_mbps": mb / dec_s, "weights": n}


def at_rmse(sweep: list[dict], rmse: float) -> float | None:
    """bits/weight at `rmse`, linear in log(RMSE) between the sweep points around it."""
    pts = sorted((r["rmse"], r["bits_per_weight"]) for r in sweep if r["rmse"] > 0)
    for (r0, b0), (r1, b1) in zip(pts, pts[1:]):
        if r0 <= rmse <= r1:
            f = (math.log(rmse) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return b0 + f * (b1 - b0)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=BUILTIN, help="a .safetensors file")
    ap.add_argument("--match", default=EXPERTS, help="regex selecting the tensors")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--formats", default="", help="comma list of codecs to keep (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tensors = load(args.input, args.match)
    n = sum(t.numel() for _, t in tensors)
    print(f"{args.input.name}: {len(tensors)} tensors, {n / 1e6:.2f} M weights (bf16)", flush=True)
    keep = set(filter(None, args.formats.split(",")))
    rows = []
    for label, codec, opts in FORMATS:
        if keep and codec not in keep:
            continue
        r = measure(tensors, codec, **opts)
        rows.append({"format": label, "codec": codec, "options": opts, **r})
        print(f"  {label:46s} {r['bits_per_weight']:7.4f} b/w  rmse {r['rmse']:.5g}  max "
              f"{r['max_err']:.4g}  enc {r['encode_mbps']:.1f} MB/s  "
              f"dec {r['decode_mbps']:.1f} MB/s",
              flush=True)
    sweeps = {}
    for codec in ("sz3", "szp"):
        sweeps[codec] = [{"abs": b, **measure(tensors, codec, "abs", b)} for b in SWEEP]
        points = (f"{s['abs']:g}->{s['bits_per_weight']:.2f}b/{s['rmse']:.3g}"
                  for s in sweeps[codec])
        print(f"  {codec} sweep: " + ", ".join(points), flush=True)
    for r in rows:
        for codec in sweeps:
            r[f"{codec}_bits_at_rmse"] = at_rmse(sweeps[codec], r["rmse"])
    doc = {"kind": "formats_bench", "input": str(args.input), "match": args.match,
           "tensors": len(tensors), "weights": n, "threads": args.threads,
           "machine": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__,
           "date": time.strftime("%Y-%m-%d"), "rows": rows, "sweeps": sweeps}
    atomic_write_json(args.out, doc)
    print("\n| format | bits/w | RMSE | max err | sz3 b/w at RMSE | szp b/w at RMSE | enc MB/s "
          "| dec MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
    for r in rows:
        print(f"| {r['format']} | {r['bits_per_weight']:.4g} | {r['rmse']:.3g} "
              f"| {r['max_err']:.3g} "
              f"| {fmt(r['sz3_bits_at_rmse'], '.2f')} | {fmt(r['szp_bits_at_rmse'], '.2f')} "
              f"| {r['encode_mbps']:.1f} | {r['decode_mbps']:.0f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
