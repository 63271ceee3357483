"""Measure the GPU section of a hardware profile (only called when CUDA is available).

- host->device and device->host copies of 64 KiB ... 1 GiB, from pinned and from pageable host
  memory, each direction and kind fitted to `latency_s + bytes / gbps` with the fit's largest
  relative error (time includes the launch and the synchronization, as a serving loop sees it);
- host->device GB/s of pinned 256 MiB copies on their own stream while bf16 GEMMs keep the GPU
  busy on another (does compute slow the link?);
- decode GB/s of every GPU-decodable codec (`szp`, `cuszp` when its library is present, `rtn8`,
  `rtn4`) per level, on 16 Mi Gaussian bf16 values, in GB/s of original bf16 bytes;
- a dense bf16 GEMM rate (8192^3) and device-to-device copy GB/s (1 GiB, read + write counted).
"""

from __future__ import annotations

from typing import Callable

import torch

from profiles.errors import CodecError
from profiles.hardware.fit import fit_link, median_seconds
from profiles.hardware.schema import Figure, GpuProfile, LevelCurve, LinkFit

GPU_STEPS = ("GPU copies", "H2D under compute", "GPU GEMM and d2d copy", "GPU codecs")
COPY_SIZES = tuple((64 << 10) * 4 ** k for k in range(8))   # 64 KiB ... 1 GiB
_GEMM_N = 8192
_UNDER_COMPUTE_BYTES = 256 << 20
_CODEC_VALUES = 16 << 20


def measure_gpu(levels, mode: str, raw: dict, step: Callable[[str], None],
                device: int = 0) -> GpuProfile:
    """Measure GPU `device`; `step(label)` is called after each of `GPU_STEPS`."""
    dev = torch.device("cuda", device)
    props = torch.cuda.get_device_properties(dev)
    links = _copies(dev, raw)
    step(GPU_STEPS[0])
    under = _h2d_under_compute(dev, raw)
    step(GPU_STEPS[1])
    gemm, d2d = _gemm_and_d2d(dev, raw)
    step(GPU_STEPS[2])
    decode = _gpu_codecs(dev, levels, mode, raw)
    step(GPU_STEPS[3])
    return GpuProfile(
        name=props.name,
        memory_bytes=Figure(float(props.total_memory), "measured",
                            "total device memory reported by CUDA"),
        h2d_pinned=links["h2d_pinned"], h2d_pageable=links["h2d_pageable"],
        d2h_pinned=links["d2h_pinned"], d2h_pageable=links["d2h_pageable"],
        h2d_under_compute_gbps=under, bf16_gemm_tflops=gemm, d2d_gbps=d2d, decode=decode)


def _copies(dev: torch.device, raw: dict) -> dict[str, LinkFit]:
    biggest = max(COPY_SIZES)
    gpu_buf = torch.empty(biggest, dtype=torch.uint8, device=dev)
    sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731
    out = {}
    for pinned in (True, False):
        host = torch.empty(biggest, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)
        kind = "pinned" if pinned else "pageable"
        for direction in ("h2d", "d2h"):
            sizes, medians, samples = [], [], {}
            for n in COPY_SIZES:
                src, dst = (host[:n], gpu_buf[:n]) if direction == "h2d" else (gpu_buf[:n], host[:n])
                reps = 10 if n <= (16 << 20) else 3
                med, s = median_seconds(lambda: dst.copy_(src, non_blocking=pinned), reps, sync)
                sizes.append(n)
                medians.append(med)
                samples[str(n)] = s
            fit = fit_link(sizes, medians)
            key = f"{direction}_{kind}"
            raw[f"gpu.{key}"] = {"bytes": sizes, "median_seconds": medians, "samples": samples}
            out[key] = LinkFit(fit.latency_s, fit.gbps, "measured",
                               f"{'host->device' if direction == 'h2d' else 'device->host'} copies "
                               f"of 64 KiB ... 1 GiB from {kind} host memory, median per size, "
                               f"least-relative-error fit", fit.max_rel_error)
        del host
    del gpu_buf
    torch.cuda.empty_cache()
    return out


def _h2d_under_compute(dev: torch.device, raw: dict) -> Figure:
    n = _UNDER_COMPUTE_BYTES
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    a = torch.randn(_GEMM_N, _GEMM_N, device=dev, dtype=torch.bfloat16)
    compute, copy = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    copies = 8
    times = []
    for _ in range(3):
        torch.cuda.synchronize(dev)
        with torch.cuda.stream(compute):
            for _ in range(60):           # ~0.1 s of GEMMs on an H200, longer elsewhere
                a @ a
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(copy):
            start.record(copy)
            for _ in range(copies):
                dst.copy_(host, non_blocking=True)
            end.record(copy)
        torch.cuda.synchronize(dev)
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    med = times[len(times) // 2]
    raw["gpu.h2d_under_compute"] = {"bytes_per_copy": n, "copies": copies, "seconds": times}
    return Figure(copies * n / med / 1e9, "measured",
                  f"{copies} pinned {n >> 20} MiB host->device copies on one stream while "
                  f"{_GEMM_N}^3 bf16 GEMMs run on another, median of 3")


def _gemm_and_d2d(dev: torch.device, raw: dict) -> tuple[Figure, Figure]:
    batch = 10
    med, s = _time_gemms(dev, batch)
    tflops = 2 * _GEMM_N ** 3 * batch / med / 1e12   # [n,n]@[n,n] = 2 n^3 FLOP
    raw["gpu.bf16_gemm"] = {"n": _GEMM_N, "gemms_per_sample": batch, "seconds": s}
    n = 1 << 30
    med_c, sc = _time_d2d(dev, n)
    raw["gpu.d2d"] = {"bytes": n, "seconds": sc}
    torch.cuda.empty_cache()
    return (Figure(tflops, "measured", f"{_GEMM_N}^3 bf16 torch.matmul, {batch} per sample, "
                                       f"median of 5 after a warm-up"),
            Figure(2 * n / med_c / 1e9, "measured", "1 GiB device-to-device copy_, read + write "
                                                    "bytes counted, median of 5"))


def _time_gemms(dev: torch.device, batch: int) -> tuple[float, list[float]]:
    a = torch.randn(_GEMM_N, _GEMM_N, device=dev, dtype=torch.bfloat16)
    b = torch.randn(_GEMM_N, _GEMM_N, device=dev, dtype=torch.bfloat16)

    def gemms():
        for _ in range(batch):
            a @ b

    return median_seconds(gemms, 5, lambda: torch.cuda.synchronize(dev))


def _time_d2d(dev: torch.device, n: int) -> tuple[float, list[float]]:
    src = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), 5, lambda: torch.cuda.synchronize(dev))


def _gpu_codecs(dev: torch.device, levels, mode: str, raw: dict) -> dict[str, LevelCurve]:
    from profiles.codecs import list_codecs
    from profiles.codecs.sources import random_tensor

    side = int(_CODEC_VALUES ** 0.5)
    tensor = random_tensor("gaussian", (side, side), "bf16", seed=0)
    names = [c.name for c in list_codecs() if c.gpu_decodable and c.name != "raw"]
    return codec_curves(names, tensor, str(dev), levels, mode, 5, raw, "gpu.decode",
                        f"decode on the GPU of {tensor.numel() >> 20} Mi Gaussian bf16 values "
                        f"(sigma 0.02), median of 5 after a warm-up; GB/s of original bf16 bytes")


def codec_curves(names, tensor, device: str, levels, mode: str, repeats: int, raw: dict,
                 raw_key: str, note: str) -> dict[str, LevelCurve]:
    """Decode GB/s (of original bf16 bytes) per level of every available codec in `names`, by
    `profiles.codecs.bench` on `tensor` on `device`; samples (or why a codec was skipped) go to
    `raw[f"{raw_key}.{name}"]`."""
    from profiles.codecs import get_codec
    from profiles.codecs.bench import bench

    out = {}
    for name in names:
        codec = get_codec(name)
        if not codec.availability()[0]:
            continue
        try:
            rows = bench([("gaussian", tensor)], [name], mode, levels, repeats=repeats,
                         device=device)
        except (ImportError, CodecError) as exc:   # recorded; the other figures still count
            raw[f"{raw_key}.{name}"] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue
        raw[f"{raw_key}.{name}"] = [r.to_dict() for r in rows]
        if codec.error_bounded:
            out[name] = LevelCurve(tuple(r.level for r in rows),
                                   tuple(r.decode_gbps for r in rows), "measured", mode, note)
        else:
            out[name] = LevelCurve((1.0,), (rows[0].decode_gbps,), "measured", None,
                                   note + f"; {name} ignores the level")
    return out
