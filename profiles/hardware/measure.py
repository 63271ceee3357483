"""Measure this machine into a `HardwareProfile` (`moesz profile hardware`).

What is measured, and how (every figure is the median of several runs after an untimed warm-up,
labelled `measured`; the samples go into the profile's `raw` section):

- host: CPU model and cores, host memory (from the OS); memory-copy GB/s (`numpy.copyto` of a
  64 MiB buffer, one thread); disk reads of 4 KiB ... 16 MiB from a scratch file, bypassing the
  page cache, fitted to `latency_s + bytes / gbps` (`profiles.hardware.disk`); SZ3 and lossless
  encode / decode GB/s per level on Gaussian bf16 weights (σ = 0.02); the CPU time of one SwiGLU
  expert FFN of Moonlight's shape (hidden 2048, expert width 1408, the study's model) in bf16
  against the number of tokens.
- gpu: with CUDA, see `profiles.hardware.measure_gpu`; without, the CPU as the runtime's device
  (`device_type` "cpu"), see `profiles.hardware.measure_cpu_device`.
- disk: reads of 4 KiB ... 16 MiB (and one packed expert record of the model) with 1, 4 and 16 in
  flight, page cache bypassed (`profiles.hardware.disk`); the curve and its best depth.
- host codecs: also how decode throughput grows with 1/2/4/8 threads decoding at once.
- model_timings (with a model): see `profiles.hardware.timings`.

The host part takes well under a minute on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from profiles.errors import CodecError, ConfigError
from profiles.hardware.disk import disk_read
from profiles.hardware.fit import median_seconds
from profiles.hardware.schema import (CodecSpeed, CpuExpertFFN, Figure, HardwareProfile,
                                      HostProfile, LevelCurve, ProfileSource, ThreadScaling,
                                      TokenCurve)

Progress = Callable[[int, int, str], None]
DEFAULT_LEVELS = (0.1, 0.3, 1.0, 2.0, 3.0)
HOST_CODECS = ("sz3", "lossless")
CPU_FFN_TOKENS = (1, 4, 16, 64)


@dataclass(frozen=True)
class Sizes:
    """Buffer sizes of a measuring run; `QUICK` is a smoke test, not a profile to plan with."""

    memcpy_bytes: int = 64 << 20
    disk_file_bytes: int = 256 << 20
    disk_sizes: tuple[int, ...] = (4096, 65536, 1 << 20, 4 << 20, 16 << 20)
    disk_depths: tuple[int, ...] = (1, 4, 16)
    codec_threads: tuple[int, ...] = (1, 2, 4, 8)
    codec_shape: tuple[int, int] = (2048, 1024)     # 2 Mi values = 4 MiB of bf16
    ffn_shape: tuple[int, int] = (2048, 1408)       # (hidden, expert width): Moonlight-16B-A3B
    ffn_tokens: tuple[int, ...] = CPU_FFN_TOKENS
    repeats: int = 3


FULL = Sizes()
QUICK = Sizes(memcpy_bytes=8 << 20, disk_file_bytes=4 << 20,
              disk_sizes=(4096, 65536, 1 << 20), disk_depths=(1, 4), codec_threads=(1, 2),
              codec_shape=(256, 256), ffn_shape=(512, 256), ffn_tokens=(1, 4, 16), repeats=2)


def measure_hardware(model: str | None = None, *, name: str | None = None,
                     disk_dir: str | os.PathLike | None = None,
                     levels: tuple[float, ...] = DEFAULT_LEVELS, mode: str = "meanabs",
                     command: str | None = None, gpu: bool | None = None, quick: bool = False,
                     progress: Progress | None = None) -> HardwareProfile:
    """Measure this machine.

    Args:
        model: optional model spec (as `moesz model`); adds `model_timings` for its shapes.
        name: profile name (default: the host name).
        disk_dir: directory for the disk-read scratch file (default: the system temp directory);
            put it on the drive that will hold offloaded experts.
        levels: bound levels at which codec throughputs are measured.
        mode: bound mode of those levels.
        command: the command line recorded in the profile.
        gpu: measure the GPU section (default: when CUDA is available). Without CUDA (or with
            `gpu=False`) the `gpu` section describes the CPU as the runtime's device
            (`device_type` "cpu", `profiles.hardware.measure_cpu_device`).
        quick: small buffers and few sizes (seconds instead of a minute): a smoke test whose
            figures are noisier; the profile's notes say so.
        progress: `progress(done, total, label)` after each step.

    Returns:
        The measured `HardwareProfile`.

    Raises:
        ConfigError: a bad disk directory or level list; ModelError for a bad model spec.
    """
    from profiles.codecs.bounds import check_request

    levels = tuple(sorted(check_request(mode, lv)[1] for lv in levels))
    if not levels:
        raise ConfigError("levels is empty; give at least one bound level, e.g. 0.1,0.3,1,2,3")
    geometry = _geometry(model) if model is not None else None
    use_gpu = torch.cuda.is_available() if gpu is None else (gpu and torch.cuda.is_available())
    steps = ["host basics", "memory copy", "disk read", "host codecs", "CPU expert FFN"]
    if use_gpu:
        from profiles.hardware.measure_gpu import GPU_STEPS

        steps += list(GPU_STEPS)
    else:
        from profiles.hardware.measure_cpu_device import DEVICE_STEPS

        steps += list(DEVICE_STEPS)
    if geometry is not None:
        steps += ["model timings"]
        if not use_gpu:
            steps += ["runtime calibration"]
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, len(steps), label)

    if progress:
        progress(0, len(steps), steps[0])
    sizes = QUICK if quick else FULL
    raw: dict = {"command": command, "quick": quick}
    cpu, cores, mem = _host_basics()
    step("host basics")
    memcpy = _memcpy_gbps(sizes, raw)
    check = _record_check_gbps(sizes, raw)
    step("memory copy")
    record = int(geometry.bytes_per_expert) if geometry is not None else None
    disk, curve = disk_read(disk_dir, sizes.disk_file_bytes, sizes.disk_sizes, raw,
                            sizes.disk_depths, record)
    step("disk read")
    codecs = _host_codecs(levels, mode, sizes, raw)
    step("host codecs")
    ffn = _cpu_expert_ffn(sizes, raw)
    step("CPU expert FFN")
    host = HostProfile(cpu=cpu, cores=cores, memory_bytes=mem, memcpy_gbps=memcpy,
                       disk_read=disk, codecs=codecs, cpu_expert_ffn=ffn, disk_curve=curve,
                       record_check_gbps=check)
    if use_gpu:
        from profiles.hardware.measure_gpu import measure_gpu

        gpu_profile = measure_gpu(levels, mode, raw, step)
    else:
        from profiles.hardware.measure_cpu_device import measure_cpu_device

        gpu_profile = measure_cpu_device(levels, mode, raw, step, memory_bytes=mem,
                                         memcpy=memcpy, codec_shape=sizes.codec_shape,
                                         repeats=sizes.repeats, quick=quick)
    timings = ()
    if geometry is not None:
        from profiles.hardware.timings import model_timings

        gpu_for_timings = None if gpu_profile.serial else gpu_profile
        timings = (model_timings(geometry, host, gpu_for_timings, raw, quick=quick),)
        step("model timings")
    source = ProfileSource(
        kind="measured", description=f"measured by moesz profile hardware on {socket.gethostname()}"
        + (" with its GPU" if use_gpu else " (no GPU visible: the CPU is the runtime's device)")
        + ("; quick smoke-test sizes, not for planning" if quick else ""),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=command, hostname=socket.gethostname(), packages=package_versions())
    prof = HardwareProfile(name=name or socket.gethostname(), host=host, source=source,
                           gpu=gpu_profile, model_timings=timings, raw=raw)
    if geometry is not None and not use_gpu:
        # the CPU device: the runtime's own runs time what a served step pays (framework code
        # between kernels, per-expert launches) that the kernel microbenchmarks leave out
        from profiles.runtime.calibrate import runtime_calibration

        prof, samples = runtime_calibration(model, prof, tokens=8 if quick else 32,
                                            batches=(1,) if quick else (1, 4),
                                            repeats=1 if quick else 3, disk_dir=disk_dir)
        raw["runtime_calibration"] = samples
        prof = dataclasses.replace(prof, raw=raw)
        step("runtime calibration")
    return prof


def package_versions() -> dict[str, str]:
    """Versions of the packages whose speed the profile reflects."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("moesz", "torch", "numpy", "pysz", "transformers", "optuna", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _geometry(model: str):
    from profiles.models import resolve_geometry

    return resolve_geometry(model)


# --- host basics ----------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _host_basics() -> tuple[str, Figure, Figure]:
    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    cores = Figure(float(usable), "measured",
                   f"logical CPUs this process may use (os.sched_getaffinity); "
                   f"{os.cpu_count()} in the machine")
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if mem is None:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return cpu, cores, Figure(float(mem), "measured", "total host memory reported by the OS")


def _memcpy_gbps(sizes: Sizes, raw: dict) -> Figure:
    n = sizes.memcpy_bytes
    src = np.ones(n, dtype=np.uint8)
    dst = np.empty_like(src)
    med, samples = median_seconds(lambda: np.copyto(dst, src), repeats=5)
    raw["host.memcpy"] = {"bytes": n, "seconds": samples}
    return Figure(n / med / 1e9, "measured",
                  f"numpy.copyto of {n >> 20} MiB, one thread, median of "
                  f"{len(samples)} after a warm-up; GB/s of bytes copied")


def _record_check_gbps(sizes: Sizes, raw: dict) -> Figure:
    """zlib.crc32 GB/s, one thread: the check of every record the disk tier reads."""
    import zlib

    buf = np.random.default_rng(1).integers(0, 256, sizes.memcpy_bytes // 4, dtype=np.uint8)
    med, samples = median_seconds(lambda: zlib.crc32(buf), repeats=5)
    raw["host.record_check"] = {"bytes": int(buf.size), "seconds": samples}
    return Figure(buf.size / med / 1e9, "measured",
                  f"zlib.crc32 of {buf.size >> 20} MiB, one thread, median of {len(samples)} "
                  f"after a warm-up (the check of each record the disk tier reads)")


# --- codecs on the CPU ----------------------------------------------------------------------------

def _host_codecs(levels, mode: str, sizes: Sizes, raw: dict) -> dict[str, CodecSpeed]:
    from profiles.codecs import get_codec
    from profiles.codecs.bench import bench
    from profiles.codecs.sources import random_tensor

    tensor = random_tensor("gaussian", sizes.codec_shape, "bf16", seed=0)
    out = {}
    for name in HOST_CODECS:
        codec = get_codec(name)
        if not codec.availability()[0]:
            continue
        try:
            rows = bench([("gaussian", tensor)], [name], mode, levels, repeats=sizes.repeats,
                         device="cpu")
        except (ImportError, CodecError) as exc:   # e.g. zstandard missing on this machine
            raw[f"host.codecs.{name}"] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue
        note = (f"one thread, {tensor.numel()} Gaussian bf16 values (sigma 0.02), median "
                f"of {sizes.repeats} after a warm-up; GB/s of original bf16 bytes")
        raw[f"host.codecs.{name}"] = [r.to_dict() for r in rows]
        threads = _thread_scaling(name, tensor, levels[len(levels) // 2], mode,
                                  sizes.codec_threads, raw)
        if codec.error_bounded:
            lv = tuple(r.level for r in rows)
            out[name] = CodecSpeed(
                decode=LevelCurve(lv, tuple(r.decode_gbps for r in rows), "measured", mode, note),
                encode=LevelCurve(lv, tuple(r.encode_gbps for r in rows), "measured", mode, note),
                threads=threads)
        else:
            r = rows[0]
            note += f"; {name} ignores the level"
            out[name] = CodecSpeed(decode=LevelCurve((1.0,), (r.decode_gbps,), "measured", None, note),
                                   encode=LevelCurve((1.0,), (r.encode_gbps,), "measured", None, note),
                                   threads=threads)
    return out


def _thread_scaling(name: str, tensor, level: float, mode: str, counts, raw: dict) -> ThreadScaling:
    """Aggregate decode throughput of N threads each decoding its own copy of one blob, as a
    multiple of one thread's: how the runtime's worker pool scales on this machine."""
    import threading
    import time

    from profiles.codecs import decode, encode
    from profiles.codecs.bounds import check_request

    from profiles.codecs import get_codec

    blob = (encode(tensor, name, *check_request(mode, level)) if get_codec(name).error_bounded
            else encode(tensor, name, None, None))
    reps = 3

    def work():
        for _ in range(reps):
            decode(blob)

    work()   # warm-up
    rates = []
    for n in counts:
        best = 0.0
        for _ in range(2):
            ts = [threading.Thread(target=work) for _ in range(n)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = max(best, n * reps / (time.perf_counter() - t0))
        rates.append(best)
    speedup = tuple(r / rates[0] for r in rates)
    raw[f"host.codecs.{name}.threads"] = {"threads": list(counts), "decodes_per_s": rates,
                                          "level": level, "mode": mode}
    return ThreadScaling(tuple(counts), speedup, "measured",
                         f"{'/'.join(map(str, counts))} threads each decoding its own blob "
                         f"({tensor.numel()} values, {mode} {level:g}) {reps} times, best of 2; "
                         f"aggregate decodes/s over one thread's")


# --- CPU expert FFN -------------------------------------------------------------------------------

def swiglu_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: down(silu(gate(x)) * up(x)); gate_up is [2I, H], down is [H, I]."""
    g, u = (x @ gate_up.T).chunk(2, dim=-1)          # [t, 2I] -> 2 x [t, I]
    return (torch.nn.functional.silu(g) * u) @ down.T  # [t, I] @ [I, H] -> [t, H]


def time_expert_ffn(hidden: int, width: int, tokens, device: str | torch.device, dtype,
                    repeats: int = 3, min_total_s: float = 0.0) -> tuple[list[float], dict]:
    """Median seconds of one expert FFN at each token count, with the samples."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    gate_up = (torch.randn(2 * width, hidden, generator=gen) * 0.02).to(dev, dtype)
    down = (torch.randn(hidden, width, generator=gen) * 0.02).to(dev, dtype)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    meds, samples = [], {}
    with torch.inference_mode():
        for t in tokens:
            x = (torch.randn(t, hidden, generator=gen)).to(dev, dtype)
            med, s = median_seconds(lambda: swiglu_ffn(x, gate_up, down), repeats, sync,
                                    min_total_s=min_total_s)
            meds.append(med)
            samples[str(t)] = s
    return meds, samples


def _cpu_expert_ffn(sizes: Sizes, raw: dict) -> CpuExpertFFN:
    hidden, width = sizes.ffn_shape
    meds, samples = time_expert_ffn(hidden, width, sizes.ffn_tokens, "cpu", torch.bfloat16,
                                    sizes.repeats)
    raw["host.cpu_expert_ffn"] = {"hidden_size": hidden, "intermediate_size": width,
                                  "threads": torch.get_num_threads(), "seconds": samples}
    curve = TokenCurve(tuple(sizes.ffn_tokens), tuple(meds), "measured",
                       f"SwiGLU expert {hidden}x{width} in bf16 with torch on "
                       f"{torch.get_num_threads()} threads, median of {sizes.repeats} after a "
                       f"warm-up; other shapes scale by parameter count")
    return CpuExpertFFN(hidden, width, curve, "bf16")
