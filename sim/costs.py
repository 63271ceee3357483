"""Per-expert sizes and decode times under a `Policy`: what one miss costs on each resource.

For every MoE layer and expert: the bytes stored in host memory (and read from SSD), the bytes
that cross the host-to-device link (compressed for GPU codecs; original for CPU codecs, which
decode on the host and send raw bytes), the GPU or CPU decode time of one expert, and the bytes
it occupies in the GPU cache (`resident_form`). Decode rates come from the hardware profile in
GB/s of original bf16 bytes (2 bytes per value), so time = values * 2 / (gbps * 1e9). CPU codec
rates are per thread; the runtime's `cpu_workers` threads each decode a whole expert, several
experts at once, and `cpu_decode_s` is one thread's time for one expert: with k experts decoding
at once each takes that x k / the measured thread scaling at k (`CodecSpeed.parallel`), which
the simulator applies per layer.
Experts run on the CPU on a miss (`on_miss = cpu`) are decoded in the calling thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from profiles.errors import ConfigError
from profiles.hardware import HardwareProfile, LevelCurve
from profiles.serving import ServingConfig
from sim.shape import expert_params

NONE, GPU, CPU = 0, 1, 2


@dataclass(frozen=True)
class ExpertCosts:
    """Arrays indexed [position in moe_layers, expert]."""

    moe_layers: tuple[int, ...]
    original_bytes: int  # one expert in the checkpoint dtype
    stored_bytes: np.ndarray  # bytes kept in host memory / on SSD
    link_bytes: np.ndarray  # bytes copied host -> device per miss
    resident_bytes: np.ndarray  # bytes held in the GPU cache
    decode_where: np.ndarray  # NONE, GPU or CPU
    gpu_decode_s: np.ndarray  # GPU decode of one expert (0 when none)
    cpu_decode_s: np.ndarray  # CPU decode of one expert by one worker thread alone (0: none)
    hit_decode_s: np.ndarray  # GPU decode on every use (compressed residency), else 0
    cpu_miss_decode_s: np.ndarray  # CPU decode (one thread) before CPU execution (on-miss cpu)
    labels: tuple[str, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, int]:
        return self.stored_bytes.shape


def _gpu_rate(hardware: HardwareProfile, codec: str, level: float | None,
              labels: set[str]) -> float:
    gpu = hardware.gpu
    where = "device (CPU) decode" if gpu.serial else "GPU decode"
    curve: LevelCurve | None = gpu.decode.get(codec)
    if curve is not None:
        labels.add(f"{codec} {where}: {curve.source}" + (f" ({curve.note})" if curve.note else ""))
        return curve.at(level)
    estimate = estimated_gpu_rate(hardware, codec)
    if estimate is not None:
        gbps, how = estimate
        labels.add(f"{codec} GPU decode: {how}")
        return gbps
    raise ConfigError(f"hardware profile {hardware.origin or hardware.name} has no {where} speed "
                      f"for codec {codec!r} (gpu.decode.{codec}); measure it with `moesz profile "
                      f"hardware` on the machine that will run the model, or choose another codec")


# DietGPU's published rANS decode on an A100: 250-410 GB/s of decoded bytes (one byte symbol per
# byte; README of facebookresearch/dietgpu). `ans` decodes one symbol per value and writes bf16, so
# per output byte it does no more work; the lower end, taken as GB/s of bf16 output, is the estimate
ANS_ESTIMATE_GBPS = 250.0


def estimated_gpu_rate(hardware: HardwareProfile, codec: str) -> tuple[float, str] | None:
    """(GB/s of bf16 output, how it was estimated) for a GPU-decodable codec the hardware profile
    has not measured, or None when there is no honest estimate (the caller refuses the codec).

    - Block formats without a bound (rtn, gq, nf4, mxfp4, GGUF types): dequantization reads the
      packed bytes and writes bf16, bandwidth-bound: half the device-to-device copy bandwidth.
    - `ans` (chunked rANS): DietGPU's published A100 decode speed, lower end (250 GB/s), capped
      at half the d2d bandwidth; moesz's Triton decoder has not been timed on a GPU.
    """
    from profiles.codecs import get_codec

    c = get_codec(codec)
    gpu = hardware.gpu
    if gpu is None or gpu.serial or not c.gpu_decodable or c.cpu_only:
        return None  # a CPU device (`gpu.serial`) decodes at its measured speeds only
    half_d2d = gpu.d2d_gbps.value / 2
    if not c.error_bounded:
        return half_d2d, (f"estimated as half the d2d copy bandwidth ({gpu.d2d_gbps.value:g} "
                          f"GB/s, {gpu.d2d_gbps.source}); not measured")
    if codec == "ans":
        gbps = min(ANS_ESTIMATE_GBPS, half_d2d)
        return gbps, (f"estimated {gbps:g} GB/s of bf16 output (DietGPU's published rANS decode "
                      f"on an A100, 250-410 GB/s, lower end, capped at half the d2d bandwidth); "
                      f"moesz's Triton ans decoder not measured on a GPU")
    return None


def _cpu_speed(hardware: HardwareProfile, codec: str, why: str):
    speed = hardware.host.codecs.get(codec)
    if speed is None:
        raise ConfigError(f"hardware profile {hardware.origin or hardware.name} has no CPU decode "
                          f"speed for codec {codec!r} (host.codecs.{codec}.decode), needed {why}; "
                          f"measure it with `moesz profile hardware` or choose another codec")
    return speed


def _cpu_rate(hardware: HardwareProfile, codec: str, level: float | None, labels: set[str],
              why: str) -> float:
    c = _cpu_speed(hardware, codec, why).decode
    labels.add(f"{codec} CPU decode: {c.source}" + (f" ({c.note})" if c.note else ""))
    return c.at(level)


def cpu_parallel(hardware: HardwareProfile, codec: str | None, workers: int,
                 labels: set[str] | None = None) -> float:
    """Experts' worth of one-thread decode that `workers` busy worker threads finish per unit
    time (measured thread scaling of `codec`, else of `sz3`, else linear)."""
    codecs = hardware.host.codecs
    speed = codecs.get(codec) if codec else None
    if speed is None or speed.threads is None:
        speed = codecs.get("sz3", speed)
    if speed is None:
        return float(workers)
    if labels is not None:
        labels.add(f"CPU decode threads: {speed.threads.source} thread scaling, "
                   f"{speed.parallel(workers):.2f}x one thread at {workers} workers"
                   if speed.threads is not None else
                   f"CPU decode threads: linear scaling to {workers} workers assumed (not measured)")
    return speed.parallel(workers)


def gil_share(hardware: HardwareProfile, labels: set[str] | None = None) -> float:
    """Share of a host-codec decode during which the decoding thread holds Python's lock, so
    that the model's own thread cannot run: estimated from the measured thread scaling at two
    threads, P2, as 2 / P2 - 1 (two decoders that never hold it scale 2x: 0; that always hold
    it, 1x: 1). 0 without a measurement. Matters on the CPU device, where the model's thread
    does the copies, decodes and compute that the simulator puts on its one device server."""
    speed = hardware.host.codecs.get("sz3")
    if speed is None or speed.threads is None or 2 not in speed.threads.threads:
        return 0.0
    p2 = speed.threads.speedup[speed.threads.threads.index(2)]
    share = min(1.0, max(0.0, 2.0 / p2 - 1.0))
    if labels is not None:
        labels.add(f"host decode holds Python's lock {share:.0%} of its time (estimated from "
                   f"the measured {p2:.2f}x of two decoding threads); on the CPU device that "
                   f"share runs in turn with the model's thread")
    return share


def _codec_flags(codec: str) -> tuple[bool, bool]:
    """(gpu_decodable, cpu_only) of a codec from the codec registry."""
    if codec == "raw":
        return False, False
    from profiles.codecs import get_codec

    c = get_codec(codec)
    return bool(c.gpu_decodable) and not bool(c.cpu_only), bool(c.cpu_only)


def build_costs(geometry: Any, policy: Any, hardware: HardwareProfile, serving: ServingConfig,
                ratios: Any) -> ExpertCosts:
    """Sizes and decode times of every routed expert under `policy`.

    Args:
        geometry: a `ModelGeometry` (or an object with its fields).
        policy: a `profiles.policy.Policy` (anything with `spec_for(layer, expert)`).
        hardware: profile with a `gpu` section.
        serving: serving configuration (resident form, decode slowdown, on-miss).
        ratios: a `sim.ratios.RatioTable` or `SyntheticRatios`.

    Raises:
        ConfigError: the hardware profile lacks a decode speed the policy needs.
    """
    L, E = len(geometry.moe_layers), geometry.experts_per_layer
    orig = int(geometry.bytes_per_expert)
    # decode work is per value: values * 2 bytes at a rate quoted in bf16 bytes per second
    bf16_bytes = 2.0 * expert_params(geometry)
    arrays = {n: np.zeros((L, E)) for n in ("stored", "link", "resident", "where", "gdec", "cdec",
                                             "hdec", "mdec")}
    labels: set[str] = set()
    memo: dict[tuple, tuple] = {}
    per_matrix = bool(getattr(policy, "matrices", None))
    for li, layer in enumerate(geometry.moe_layers):
        for e in range(E):
            specs = policy.expert_specs(layer, e) if per_matrix else None
            spec = specs.uniform if specs is not None else policy.spec_for(layer, e)
            if spec is None:   # its matrices are stored differently
                key = (li, specs)
                make = lambda: _matrix_rows(geometry, layer, specs, hardware, serving,  # noqa: E731
                                            ratios, orig, bf16_bytes, labels)
            else:
                key = (li, spec.codec, getattr(spec, "mode", None), getattr(spec, "level", None),
                       tuple(sorted((getattr(spec, "codec_options", None) or {}).items())))
                make = lambda: _expert_row(geometry, layer, spec, hardware, serving,  # noqa: E731
                                           ratios, orig, bf16_bytes, labels)
            row = memo.get(key)
            if row is None:
                row = memo[key] = make()
            for name, v in zip(arrays, row):
                arrays[name][li, e] = v
    if any(len(key) == 2 or key[1] != "raw" for key in memo):
        labels.add(f"sizes: {ratios.label}")
    return ExpertCosts(
        moe_layers=tuple(geometry.moe_layers), original_bytes=orig,
        stored_bytes=arrays["stored"].astype(np.int64), link_bytes=arrays["link"].astype(np.int64),
        resident_bytes=arrays["resident"].astype(np.int64),
        decode_where=arrays["where"].astype(np.int8), gpu_decode_s=arrays["gdec"],
        cpu_decode_s=arrays["cdec"], hit_decode_s=arrays["hdec"], cpu_miss_decode_s=arrays["mdec"],
        labels=tuple(sorted(labels)))


def _expert_row(geometry, layer, spec, hardware, serving, ratios, orig, bf16_bytes, labels):
    codec = spec.codec
    ratio = ratios.ratio(layer, spec, geometry)
    stored = int(round(orig / ratio))
    gpu_ok, _ = _codec_flags(codec)
    level = getattr(spec, "level", None)
    where, gdec, cdec, hdec, mdec = NONE, 0.0, 0.0, 0.0, 0.0
    link = resident = orig
    if getattr(geometry, "dtype", None) == "mxfp4":
        # a checkpoint shipped in MXFP4 (gpt-oss): a decoded expert is held in bf16, 3.6x its
        # shipped bytes (the runtime's cache counts the same)
        resident = int(bf16_bytes)
        if codec == "raw":
            # raw experts cross the link as shipped and are dequantized on the GPU, like `mxfp4`
            where = GPU
            gdec = bf16_bytes / (_gpu_rate(hardware, "mxfp4", None, labels) * 1e9)
            gdec *= serving.gpu_decode_slowdown if serving.gpu_decode == "stream" else 1.0
            if serving.resident_form == "compressed":
                resident, hdec = orig, gdec
            labels.add("raw: the experts as shipped (MXFP4), dequantized on the GPU and held "
                       "in bf16")
    if codec != "raw":
        if gpu_ok:
            where = GPU
            link = stored
            gdec = bf16_bytes / (_gpu_rate(hardware, codec, level, labels) * 1e9)
            gdec *= serving.gpu_decode_slowdown if serving.gpu_decode == "stream" else 1.0
            if serving.resident_form == "compressed":
                resident, hdec = stored, gdec
        else:
            where = CPU
            # each worker decodes a whole expert; k busy workers run at parallel(k) / k of one
            cdec = bf16_bytes / (_cpu_rate(hardware, codec, level, labels,
                                           "because it decodes on the CPU") * 1e9)
            cpu_parallel(hardware, codec, serving.cpu_workers, labels)   # its label
        if serving.on_miss == "cpu":
            # decoded in the thread that runs the expert
            why = "to run missed experts on the CPU"
            if codec not in hardware.host.codecs and hardware.gpu.serial \
                    and codec in hardware.gpu.decode:
                rate = _gpu_rate(hardware, codec, level, labels)  # the CPU device's own decode
            else:
                rate = _cpu_rate(hardware, codec, level, labels, why)
            mdec = bf16_bytes / (rate * 1e9)
    return stored, link, resident, where, gdec, cdec, hdec, mdec


def _matrix_rows(geometry, layer, specs, hardware, serving, ratios, orig, bf16_bytes, labels):
    """`_expert_row` of an expert whose matrices are stored differently: each matrix costs its
    share of the expert's values under its own spec, and the shares add up. Stored bytes are the
    sum of the matrices' stored bytes (each the matrix's original bytes over its ratio: the
    profile's per-matrix ratio where it has one, else the expert's ratio for that spec). As the
    runtime does (`ExpertRecord.device_decodable`), the expert decodes on the GPU only if every
    matrix does; otherwise on the CPU, every non-raw matrix at its codec's CPU rate, and the
    decoded expert crosses the link."""
    from profiles.matrices import matrix_values

    values = matrix_values(geometry.expert_tensor_shapes, split=specs.splits_gate_up)
    total = sum(values.values())
    rows = {}
    for kind, n in values.items():
        frac = n / total   # [values of the matrix] / [values of the expert]
        spec = specs.for_matrix(kind)
        rows[kind] = (spec, frac, _expert_row(geometry, layer, spec, hardware, serving,
                                              _MatrixRatios(ratios, kind), orig * frac,
                                              bf16_bytes * frac, labels))
    stored = sum(r[0] for _, _, r in rows.values())
    mdec = sum(r[7] for _, _, r in rows.values())
    if any(r[3] == CPU for _, _, r in rows.values()):
        cdec = 0.0
        for spec, frac, r in rows.values():
            if r[3] == CPU:
                cdec += r[5]
            elif spec.codec != "raw":   # a GPU codec decoded on the host with the rest
                cdec += bf16_bytes * frac / (_cpu_rate(
                    hardware, spec.codec, getattr(spec, "level", None), labels,
                    "because another matrix of the same expert decodes on the CPU") * 1e9)
        labels.add("per-matrix experts with a CPU-decoded matrix decode whole on the CPU "
                   "(as the runtime does)")
        return stored, orig, orig, CPU, 0.0, cdec, 0.0, mdec
    where = GPU if any(r[3] == GPU for _, _, r in rows.values()) else NONE
    link = sum(r[1] for _, _, r in rows.values())
    resident = sum(r[2] for _, _, r in rows.values())
    gdec = sum(r[4] for _, _, r in rows.values())
    hdec = sum(r[6] for _, _, r in rows.values())
    return stored, link, resident, where, gdec, 0.0, hdec, mdec


class _MatrixRatios:
    """A ratio source seen from one matrix kind: its per-matrix ratio where it has one."""

    def __init__(self, ratios, kind: str) -> None:
        self.ratios, self.kind = ratios, kind

    def ratio(self, layer, spec, geometry):
        per_matrix = getattr(self.ratios, "matrix_ratio", None)
        if per_matrix is not None:
            r = per_matrix(layer, spec, geometry, self.kind)
            if r is not None:
                return r
        return self.ratios.ratio(layer, spec, geometry)


def uniform_costs(moe_layers: tuple[int, ...], experts_per_layer: int, *, original_bytes: int,
                  stored_bytes: int | None = None, gpu_decode_s: float = 0.0,
                  cpu_decode_s: float = 0.0, resident_compressed: bool = False,
                  label: str = "explicit sizes") -> ExpertCosts:
    """Costs with the same size and decode time for every expert (tests, what-if by hand)."""
    L, E = len(moe_layers), experts_per_layer
    stored = original_bytes if stored_bytes is None else stored_bytes
    where = GPU if gpu_decode_s > 0 else (CPU if cpu_decode_s > 0 else NONE)
    full = lambda v, dt=np.float64: np.full((L, E), v, dtype=dt)  # noqa: E731
    link = original_bytes if where == CPU else stored
    resident = stored if (resident_compressed and where == GPU) else original_bytes
    return ExpertCosts(tuple(moe_layers), int(original_bytes), full(stored, np.int64),
                       full(link, np.int64), full(resident, np.int64), full(where, np.int8),
                       full(gpu_decode_s if where == GPU else 0.0), full(cpu_decode_s),
                       full(gpu_decode_s if resident_compressed and where == GPU else 0.0),
                       full(cpu_decode_s), (label,))
