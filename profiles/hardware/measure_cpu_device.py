"""The device section of a hardware profile measured on a machine without a GPU: the CPU as the
runtime's device (`device_type` "cpu").

On such a machine `moesz run` computes on the CPU, and what the simulator must predict is that
run, not a GPU's. What the runtime does there, and what is measured for it:

- the "host-to-device link" is the copy the runtime performs of an expert record (`torch.clone`
  of a uint8 tensor): copies of 4 KiB ... 64 MiB, fitted to `latency_s + bytes / gbps`, the same
  fit for pinned and pageable (the CPU has no pinned memory) and for the reverse direction;
- in-place decode of every codec the runtime decodes on its device (`szp`, `ans`, `rtn8`/`rtn4`,
  `gq`, `nf4`, `mxfp4`, the GGUF types), per level, on the CPU in the model's thread
  (`profiles.runtime.device_decode`), in GB/s of original bf16 bytes;
- a bf16 GEMM rate (a [64, H] x [H, 4H] product: the shape of a decode step's expert work) and
  the memory-copy bandwidth as the "device-to-device" figure, for roofline estimates.

Copy, decode and compute run one after another in the thread that runs the model, which the
simulator models as one serial device (`GpuProfile.serial`).
"""

from __future__ import annotations

import torch

from profiles.errors import CodecError
from profiles.hardware.fit import fit_link, median_seconds
from profiles.hardware.schema import Figure, GpuProfile, LevelCurve, LinkFit

COPY_SIZES = tuple((4 << 10) * 4 ** k for k in range(7))   # 4 KiB ... 16 MiB
DEVICE_STEPS = ("device copies", "device GEMM", "device codecs")


def measure_cpu_device(levels, mode: str, raw: dict, step, *, memory_bytes: Figure,
                       memcpy: Figure, codec_shape: tuple[int, int], repeats: int,
                       quick: bool = False) -> GpuProfile:
    """The CPU as the runtime's device; `step(label)` after each of `DEVICE_STEPS`."""
    link = _copies(raw, COPY_SIZES[:5] if quick else COPY_SIZES)
    step(DEVICE_STEPS[0])
    gemm = _gemm(raw, 512 if quick else 2048)
    step(DEVICE_STEPS[1])
    decode = _codecs(levels, mode, raw, codec_shape, repeats)
    step(DEVICE_STEPS[2])
    threads = torch.get_num_threads()
    return GpuProfile(
        name=f"CPU as the runtime's device ({threads} torch threads)",
        memory_bytes=Figure(memory_bytes.value, memory_bytes.source,
                            "host memory: the CPU device's memory is the host's"),
        h2d_pinned=link, h2d_pageable=link, d2h_pinned=link, d2h_pageable=link,
        h2d_under_compute_gbps=Figure(link.gbps, "measured", "the copy fit's bandwidth: on the "
                                      "CPU device copies and compute share one thread"),
        bf16_gemm_tflops=gemm,
        d2d_gbps=Figure(memcpy.value, memcpy.source, "host memory copy: " + memcpy.note),
        decode=decode, device_type="cpu")


def _copies(raw: dict, sizes) -> LinkFit:
    src = torch.ones(max(sizes), dtype=torch.uint8)
    medians, samples = [], {}
    for n in sizes:
        part = src[:n]
        med, s = median_seconds(lambda: part.clone(), 5 if n <= (1 << 20) else 3,
                                min_total_s=0.02)
        medians.append(med)
        samples[str(n)] = s
    fit = fit_link(list(sizes), medians)
    raw["device.copy"] = {"bytes": list(sizes), "median_seconds": medians, "samples": samples}
    return LinkFit(fit.latency_s, fit.gbps, "measured",
                   f"torch clone of uint8 records of {sizes[0] >> 10} KiB ... {sizes[-1] >> 20} "
                   f"MiB (the runtime's copy of an expert record on the CPU device), median per "
                   f"size, least-relative-error fit", fit.max_rel_error)


def _gemm(raw: dict, hidden: int) -> Figure:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, hidden, generator=gen).to(torch.bfloat16)
    b = torch.randn(hidden, 4 * hidden, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        med, s = median_seconds(lambda: a @ b, 3, min_total_s=0.1)
    raw["device.bf16_gemm"] = {"shape": [64, hidden, 4 * hidden], "seconds": s}
    return Figure(2 * 64 * hidden * 4 * hidden / med / 1e12, "measured",
                  f"[64, {hidden}] x [{hidden}, {4 * hidden}] bf16 torch.matmul on "
                  f"{torch.get_num_threads()} threads, median after a warm-up")


def _codecs(levels, mode: str, raw: dict, shape, repeats: int) -> dict[str, LevelCurve]:
    from profiles.codecs import list_codecs
    from profiles.codecs.bench import bench
    from profiles.codecs.sources import random_tensor
    from profiles.runtime.device_decode import decodes_in_place

    tensor = random_tensor("gaussian", shape, "bf16", seed=0)
    out = {}
    for codec in list_codecs():
        if codec.name == "raw" or not decodes_in_place(codec.name) or \
                not codec.availability()[0]:
            continue
        try:
            rows = bench([("gaussian", tensor)], [codec.name], mode, levels, repeats=repeats,
                         device="cpu")
        except (ImportError, CodecError) as exc:   # recorded; the other figures still count
            raw[f"device.decode.{codec.name}"] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue
        raw[f"device.decode.{codec.name}"] = [r.to_dict() for r in rows]
        note = (f"decode on the CPU device (the model's thread, {torch.get_num_threads()} torch "
                f"threads) of {tensor.numel()} Gaussian bf16 values (sigma 0.02), median of "
                f"{repeats} after a warm-up; GB/s of original bf16 bytes")
        if codec.error_bounded:
            out[codec.name] = LevelCurve(tuple(r.level for r in rows),
                                         tuple(r.decode_gbps for r in rows), "measured", mode, note)
        else:
            out[codec.name] = LevelCurve((1.0,), (rows[0].decode_gbps,), "measured", None,
                                         note + f"; {codec.name} ignores the level")
    return out
