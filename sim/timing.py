"""Compute times: attention + router per layer, one expert's FFN, the LM head.

From the hardware profile's `model_timings` when they were measured for this model's shapes;
otherwise a roofline estimate (the larger of bytes / copy bandwidth and FLOPs / GEMM rate, as
MoE-Lightning's cost model does) from the profile's GEMM rate and device-to-device bandwidth,
labelled `estimated`. Every figure's provenance is in `labels`.
"""

from __future__ import annotations

from typing import Any

from profiles.errors import ConfigError
from profiles.hardware import HardwareProfile
from sim.shape import (KV_DTYPE_BYTES, dtype_bytes, expert_params, kv_bytes_per_token,
                       non_expert_bytes_per_layer)


class TimeModel:
    """Seconds of GPU and CPU compute for one model on one machine."""

    def __init__(self, hardware: HardwareProfile, geometry: Any, batch: int | None = None) -> None:
        """`batch`: the serving batch size, for timings calibrated per batch (`by_batch`)."""
        if hardware.gpu is None:
            raise ConfigError(f"hardware profile {hardware.origin or hardware.name} has no 'gpu' "
                              f"section; the simulator needs one (use --hardware "
                              f"preset:h200-published or a profile measured on a GPU machine)")
        self.g = geometry
        gpu = hardware.gpu
        self.host = hardware.host
        self.hbm_bps = gpu.d2d_gbps.value * 1e9
        self.flops = gpu.bf16_gemm_tflops.value * 1e12
        self.wbytes = dtype_bytes(geometry.dtype)
        self.params = expert_params(geometry)
        self.timings = hardware.timings_for(geometry)
        self.batch = batch
        # the runtime's own work per fetched expert on the CPU device (calibrated per batch)
        self.miss_overhead_s = (self.timings.miss_overhead_s(batch)
                                if self.timings is not None and hardware.gpu.serial else 0.0)
        # and per host-codec miss (beyond its decode's held share of Python's lock)
        host = None if self.timings is None else self.timings.host_miss_overhead_s
        self.host_miss_overhead_s = (host if host is not None and hardware.gpu.serial
                                     else self.miss_overhead_s)
        # and per miss of an expert decoded in place on the device
        dec = None if self.timings is None else self.timings.decode_miss_overhead_s
        self.decode_miss_overhead_s = dec if dec is not None and hardware.gpu.serial else 0.0
        # and per record the disk tier reads
        read = None if self.timings is None else self.timings.disk_read_overhead_s
        self.disk_read_overhead_s = read if read is not None and hardware.gpu.serial else 0.0
        self.layer_bytes = non_expert_bytes_per_layer(geometry)
        self.kv_layer_token = kv_bytes_per_token(geometry) / geometry.num_layers
        self._expert: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        roof = (f"roofline from bf16 GEMM {gpu.bf16_gemm_tflops.value:g} TFLOP/s "
                f"({gpu.bf16_gemm_tflops.source}) and d2d {gpu.d2d_gbps.value:g} GB/s "
                f"({gpu.d2d_gbps.source})")
        if self.timings is not None:
            t = self.timings
            per = (f", at batch {batch} between the calibrated batches "
                   f"{'/'.join(str(b.batch) for b in t.by_batch)}" if t.by_batch and batch else "")
            self.labels = [f"attention+router: {t.attention_router.source} (model_timings {t.model})",
                           f"expert FFN: {t.expert_ffn.source}{per} (model_timings {t.model})",
                           "LM head: " + (f"{t.lm_head.source} (model_timings {t.model})"
                                          if t.lm_head else f"estimated, {roof}")]
        else:
            self.labels = [f"attention+router, expert FFN, LM head: estimated, {roof}"]
        if self.miss_overhead_s > 0:
            self.labels.append(f"runtime work per fetched expert on the CPU device: "
                               f"{self.miss_overhead_s * 1e6:.0f} us, measured (model_timings "
                               f"{self.timings.model}, calibrated cold runs)")
        if self.host_miss_overhead_s != self.miss_overhead_s:
            self.labels.append(f"runtime work per host-codec miss on the CPU device beyond the "
                               f"decode's held share of Python's lock: "
                               f"{self.host_miss_overhead_s * 1e6:.0f} us, measured (model_timings "
                               f"{self.timings.model}, a calibrated cold run of a host codec)")
        if self.decode_miss_overhead_s > 0:
            self.labels.append(f"runtime work per miss decoded in place on the CPU device beyond "
                               f"its copy and decode: {self.decode_miss_overhead_s * 1e6:.0f} us, "
                               f"measured (model_timings {self.timings.model}, a calibrated cold "
                               f"run of a device codec)")
        if self.disk_read_overhead_s > 0:
            self.labels.append(f"runtime work per record read from disk on the CPU device: "
                               f"{self.disk_read_overhead_s * 1e6:.0f} us, measured (model_timings "
                               f"{self.timings.model}, a calibrated cold run served from disk)")
        ffn = self.host.cpu_expert_ffn
        self.labels.append("CPU expert FFN: " + (
            f"{ffn.curve.source}, scaled from a {ffn.hidden_size}x{ffn.intermediate_size} expert by "
            f"parameter count" if ffn else
            f"estimated from host memcpy {self.host.memcpy_gbps.value:g} GB/s "
            f"({self.host.memcpy_gbps.source})"))

    def _roofline(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.hbm_bps, flops / self.flops)

    def attention_s(self, tokens: int, batch: int, context: int, phase: str) -> float:
        """One decoder layer's attention, router and other non-expert work.

        Args:
            tokens: tokens processed in the pass (batch for decode, batch * prompt for prefill).
            batch: sequences.
            context: context length per sequence at the end of the pass.
            phase: `prefill` or `decode`.
        """
        if self.timings is not None:
            return self.timings.attention_router.at(tokens if phase == "prefill" else batch, context)
        g = self.g
        # weights read once per pass, plus K/V of every sequence: batch * context * kv bytes
        kv = batch * context * self.kv_layer_token
        mean_ctx = context / 2 if phase == "prefill" else context
        # [tokens, params] GEMMs: 2 * params * tokens; attention: 4 * tokens * ctx * heads * head_dim
        flops = (2 * (self.layer_bytes / self.wbytes) * tokens
                 + 4 * tokens * mean_ctx * g.num_attention_heads * g.head_dim)
        return self._roofline(self.layer_bytes + kv, flops)

    def lm_head_s(self, tokens: int) -> float:
        if self.timings is not None and self.timings.lm_head is not None:
            return self.timings.lm_head.at(tokens)
        g = self.g
        # [tokens, hidden] x [hidden, vocab]: bytes = V * H * dtype, flops = 2 * t * H * V
        return self._roofline(g.vocab_size * g.hidden_size * self.wbytes,
                              2 * tokens * g.hidden_size * g.vocab_size)

    def expert_s(self, tokens: int) -> float:
        """One routed expert's FFN on the GPU for `tokens` tokens (decompressed weights)."""
        v = self._expert.get(tokens)
        if v is None:
            if self.timings is not None:
                v = self.timings.expert_s(tokens, self.batch)
            else:
                # read all expert weights once; 2 FLOPs per parameter per token
                v = self._roofline(self.params * self.wbytes, 2 * self.params * tokens)
            self._expert[tokens] = v
        return v

    def cpu_expert_s(self, tokens: int) -> float:
        """One routed expert's FFN on the CPU for `tokens` tokens."""
        v = self._cpu.get(tokens)
        if v is None:
            ffn = self.host.cpu_expert_ffn
            if ffn is not None:
                v = ffn.seconds(tokens, self.params)
            else:
                v = self.params * self.wbytes / (self.host.memcpy_gbps.value * 1e9)
            self._cpu[tokens] = v
        return v


__all__ = ["TimeModel", "KV_DTYPE_BYTES"]
