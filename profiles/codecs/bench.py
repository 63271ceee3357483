"""Measure codecs on tensors: ratio, encode/decode throughput, max error ÷ bound, RMSE.

Throughputs are GB/s (1e9 bytes) of ORIGINAL bytes, the median of `repeats` timed runs after one
untimed warm-up; ratios count every stored byte. Used by `moesz codecs bench` and by the scripts
under `benchmarks/`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from profiles.codecs.api import decode, encode
from profiles.codecs.bounds import check_request
from profiles.codecs.registry import get_codec
from profiles.errors import CodecError, ConfigError

CSV_COLUMNS = ("tensor", "codec", "mode", "level", "abs_bound", "ratio", "encode_gbps",
               "decode_gbps", "max_err_over_bound", "rmse")


@dataclass(frozen=True)
class BenchRow:
    """One measured (tensor, codec, level) combination. All figures are measured here."""

    tensor: str
    codec: str
    mode: str | None
    level: float | None
    abs_bound: float | None
    ratio: float
    encode_gbps: float
    decode_gbps: float
    max_err_over_bound: float | None
    rmse: float
    max_abs_err: float
    original_nbytes: int
    blob_nbytes: int
    lossless_fallback: bool
    repeats: int
    device: str

    def csv_row(self) -> list:
        return [getattr(self, c) if getattr(self, c) is not None else "" for c in CSV_COLUMNS]

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()                                        # warm-up (kernel compilation, allocator)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plan_runs(codecs: Sequence[str], levels: Sequence[float]) -> list[tuple[str, float | None]]:
    """(codec, level) pairs: every level for error-bounded codecs, one run for the others."""
    runs = []
    for name in codecs:
        if get_codec(name).error_bounded:
            runs.extend((name, lv) for lv in levels)
        else:
            runs.append((name, None))
    return runs


def bench(tensors: Sequence[tuple[str, torch.Tensor]], codecs: Sequence[str], mode: str,
          levels: Sequence[float], repeats: int = 3, device: str = "cpu",
          options: dict[str, dict] | None = None,
          progress: Callable[[int, int, str], None] | None = None) -> list[BenchRow]:
    """Measure every tensor x codec x level.

    Args:
        tensors: (name, tensor) pairs; moved to `device` before timing.
        codecs: codec names (validated before any work).
        mode: bound mode for error-bounded codecs.
        levels: bound values (validated before any work).
        repeats: timed runs per direction (median reported), after one warm-up run.
        device: where tensors live and blobs are decoded ("cpu" or "cuda").
        options: per-codec options, e.g. {"sz3": {"predictor": "lorenzo"}}.
        progress: callback(done, total, label).

    Returns:
        One BenchRow per run.
    """
    options = options or {}
    for lv in levels:
        check_request(mode, lv)
    runs = plan_runs(codecs, levels)
    for name in codecs:
        get_codec(name).check_options(options.get(name, {}))
        ok, why = get_codec(name).availability()
        if not ok:
            raise CodecError(f"codec {name!r} is not available here: {why}")
    if repeats < 1:
        raise ConfigError(f"repeats={repeats} is invalid; give 1 or more")
    dev = torch.device(device)
    total = len(tensors) * len(runs)
    rows, done = [], 0
    for tname, t in tensors:
        t = t.to(dev)
        x32 = t.to(torch.float32)
        for cname, level in runs:
            if progress:
                progress(done, total, f"{tname} {cname} {'' if level is None else level}")
            opts = options.get(cname, {})
            holder = {}

            def do_encode():
                holder["blob"] = encode(t, cname, mode, level, **opts)

            enc_s = _median_seconds(do_encode, repeats, dev)
            blob = holder["blob"]
            dec_s = _median_seconds(lambda: decode(blob, device=dev), repeats, dev)
            err = (decode(blob, device=dev).to(torch.float32) - x32).reshape(-1)
            max_err = float(err.abs().max()) if err.numel() else 0.0
            rmse = float(err.double().pow(2).mean().sqrt()) if err.numel() else 0.0
            bounded = get_codec(cname).error_bounded
            ratio_err = None
            if blob.abs_bound:
                ratio_err = max_err / blob.abs_bound
            rows.append(BenchRow(
                tensor=tname, codec=cname, mode=mode if bounded else None, level=level,
                abs_bound=blob.abs_bound, ratio=blob.ratio,
                encode_gbps=blob.original_nbytes / enc_s / 1e9 if enc_s > 0 else math.inf,
                decode_gbps=blob.original_nbytes / dec_s / 1e9 if dec_s > 0 else math.inf,
                max_err_over_bound=ratio_err, rmse=rmse, max_abs_err=max_err,
                original_nbytes=blob.original_nbytes, blob_nbytes=blob.nbytes,
                lossless_fallback=blob.lossless_fallback, repeats=repeats, device=str(dev)))
            done += 1
    if progress:
        progress(done, total, "done")
    return rows
