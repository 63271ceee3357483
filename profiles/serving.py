"""The serving configuration shared by the simulator (`sim/`) and the real offloaded runtime.

A `ServingConfig` says how an MoE model is served: the GPU and host memory budgets, the expert
cache (policy, optional per-layer allocation, resident form), prefetch, where a miss is served
(fetched to the GPU, or computed on the CPU as Fiddler and llama.cpp's `--n-cpu-moe` do), how GPU
decompression shares the device, and the workload shape (batch, prompt and generated tokens).

Memory budgets are given either in bytes or as a fraction. A GPU fraction `f` means the
non-expert weights plus the KV cache plus `f` times the uncompressed routed-expert bytes; a host
fraction means `f` times the uncompressed routed-expert bytes. `parse_mem` reads both forms.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from profiles.errors import ConfigError

CACHE_POLICY_NAMES = ("lru", "lfu", "static-hot")
RESIDENT_FORMS = ("decompressed", "compressed")
ON_MISS = ("fetch", "cpu")
GPU_DECODE_MODES = ("stream", "compute")

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_MEM_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


@dataclass(frozen=True)
class MemBudget:
    """A memory budget: an absolute size in bytes, or a fraction (see the module docstring).

    Exactly one of `bytes` and `fraction` is set; both None means unlimited.
    """

    bytes: int | None = None
    fraction: float | None = None

    @property
    def unlimited(self) -> bool:
        return self.bytes is None and self.fraction is None

    def __str__(self) -> str:
        if self.bytes is not None:
            return format_bytes(self.bytes)
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return "unlimited"


def parse_mem(text: str | int | float | None, *, what: str = "memory budget") -> MemBudget:
    """Parse a memory budget: `24GiB`, `80GB`, `512MiB`, `1e9`, `25%`, `0.25x`, or `unlimited`.

    Args:
        text: the budget; ints are bytes; `N%` or `Nx` is a fraction; decimal (`GB`) and binary
            (`GiB`) units are both accepted.
        what: the name of the option, used in error messages.

    Returns:
        A `MemBudget`.

    Raises:
        ConfigError: negative, not a number, an unknown unit, or a fraction above 100 %.
    """
    if text is None:
        return MemBudget()
    if isinstance(text, bool):
        raise ConfigError(f"{what}: {text!r} is not a size; use e.g. 24GiB or 25%")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        s = str(text).strip()
        if s.lower() in ("unlimited", "inf", "none"):
            return MemBudget()
        if s.startswith("-"):
            raise ConfigError(f"{what}: {s!r} is negative; a budget must be >= 0 (e.g. 24GiB or 25%)")
        m = _MEM_RE.match(s)
        if not m:
            raise ConfigError(f"{what}: cannot read {s!r}; use a size such as 24GiB, 80GB, 512MiB "
                              f"or a fraction such as 25%")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what}: {text!r} is negative or not finite; a budget must be >= 0")
    if unit in ("%", "x"):
        frac = value / 100 if unit == "%" else value
        if frac > 1.0:
            raise ConfigError(f"{what}: {text!r} is more than 100 % of the routed-expert bytes; "
                              f"use a fraction <= 100% or an absolute size")
        return MemBudget(fraction=frac)
    if unit not in _UNITS:
        raise ConfigError(f"{what}: unknown unit {unit!r} in {text!r}; use B, KB, MB, GB, TB, KiB, "
                          f"MiB, GiB, TiB or %")
    return MemBudget(bytes=int(round(value * _UNITS[unit])))


def format_bytes(n: float) -> str:
    """Human-readable binary size: 25769803776 -> '24.0 GiB'."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class ServingConfig:
    """How an offloaded MoE model is served. Shared by `sim` and the real runtime.

    Attributes:
        gpu_mem_bytes / gpu_mem_fraction: GPU budget (at most one set; neither = unlimited).
        host_mem_bytes / host_mem_fraction: host budget for stored experts (neither = unlimited).
        cache_policy: `lru`, `lfu` or `static-hot` (pin the most activated experts from traces).
        per_layer_cache_slots: experts cached per MoE layer (index = position in `moe_layers`);
            None = one cache shared by all layers.
        resident_form: cached experts kept `decompressed`, or `compressed` and decoded every use.
        prefetch: `none`, `next:ACC` (next layer, prediction accuracy ACC in [0, 1]) or `oracle`.
        on_miss: `fetch` (copy to the GPU) or `cpu` (compute the missed expert on the CPU).
        batch_size: sequences decoded together.
        prompt_tokens: prompt length per sequence (prefill).
        generated_tokens: decode steps per sequence.
        pinned: host buffers page-locked (pinned link fit) or pageable.
        gpu_decode: `stream` (GPU decompression on its own stream, overlapping compute) or
            `compute` (in line on the compute stream, no overlap).
        gpu_decode_slowdown: factor (>= 1) on GPU decode time on its own stream, for contention
            with compute kernels.
        cpu_workers: CPU worker threads decoding host-codec experts, one expert per thread
            and several experts at once (how far that scales is the hardware profile's measured
            thread scaling).
        staging_slots: decompressed expert buffers reserved on the GPU for misses.
        disk_depth: reads in flight of experts not held in host memory (the disk tier); None:
            the runtime reads 4 at once and the simulator uses the profile's best depth.
    """

    gpu_mem_bytes: int | None = None
    gpu_mem_fraction: float | None = None
    host_mem_bytes: int | None = None
    host_mem_fraction: float | None = None
    cache_policy: str = "lru"
    per_layer_cache_slots: tuple[int, ...] | None = None
    resident_form: str = "decompressed"
    prefetch: str = "none"
    on_miss: str = "fetch"
    batch_size: int = 1
    prompt_tokens: int = 128
    generated_tokens: int = 256
    pinned: bool = True
    gpu_decode: str = "stream"
    gpu_decode_slowdown: float = 1.0
    cpu_workers: int = 8
    staging_slots: int = 2
    disk_depth: int | None = None

    def __post_init__(self) -> None:
        _check_budget("gpu_mem", self.gpu_mem_bytes, self.gpu_mem_fraction)
        _check_budget("host_mem", self.host_mem_bytes, self.host_mem_fraction)
        _check_choice("cache_policy", self.cache_policy, CACHE_POLICY_NAMES)
        _check_choice("resident_form", self.resident_form, RESIDENT_FORMS)
        _check_choice("on_miss", self.on_miss, ON_MISS)
        _check_choice("gpu_decode", self.gpu_decode, GPU_DECODE_MODES)
        parse_prefetch(self.prefetch)
        for name, low in (("batch_size", 1), ("prompt_tokens", 0), ("generated_tokens", 1),
                          ("cpu_workers", 1), ("staging_slots", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"serving config: {name} is {v!r}; expected an integer >= {low}")
        if self.disk_depth is not None and (not isinstance(self.disk_depth, int)
                                            or isinstance(self.disk_depth, bool)
                                            or self.disk_depth < 1):
            raise ConfigError(f"serving config: disk_depth is {self.disk_depth!r}; expected an "
                              f"integer >= 1 (reads in flight)")
        if not (isinstance(self.gpu_decode_slowdown, (int, float))
                and math.isfinite(self.gpu_decode_slowdown) and self.gpu_decode_slowdown >= 1.0):
            raise ConfigError(f"serving config: gpu_decode_slowdown is {self.gpu_decode_slowdown!r}; "
                              f"expected a number >= 1")
        if self.per_layer_cache_slots is not None:
            slots = tuple(self.per_layer_cache_slots)
            if any(not isinstance(s, int) or s < 0 for s in slots):
                raise ConfigError(f"serving config: per_layer_cache_slots {slots!r} must be "
                                  f"integers >= 0, one per MoE layer")
            object.__setattr__(self, "per_layer_cache_slots", slots)

    @property
    def gpu_budget(self) -> MemBudget:
        return MemBudget(self.gpu_mem_bytes, self.gpu_mem_fraction)

    @property
    def host_budget(self) -> MemBudget:
        return MemBudget(self.host_mem_bytes, self.host_mem_fraction)

    @property
    def prefetch_mode(self) -> tuple[str, float]:
        """(`none`|`next`|`oracle`, accuracy); accuracy is 1.0 for oracle, 0.0 for none."""
        return parse_prefetch(self.prefetch)

    def with_budgets(self, gpu: MemBudget | None = None, host: MemBudget | None = None
                     ) -> "ServingConfig":
        """A copy with the given budgets replaced (None leaves that budget as is)."""
        kw: dict[str, Any] = {}
        if gpu is not None:
            kw.update(gpu_mem_bytes=gpu.bytes, gpu_mem_fraction=gpu.fraction)
        if host is not None:
            kw.update(host_mem_bytes=host.bytes, host_mem_fraction=host.fraction)
        return replace(self, **kw)

    def resolve_gpu_bytes(self, non_expert_bytes: int, kv_bytes: int,
                          routed_expert_bytes: int) -> int | None:
        """The GPU budget in bytes (None = unlimited); see the module docstring for fractions."""
        if self.gpu_mem_bytes is not None:
            return int(self.gpu_mem_bytes)
        if self.gpu_mem_fraction is not None:
            return int(non_expert_bytes + kv_bytes + self.gpu_mem_fraction * routed_expert_bytes)
        return None

    def resolve_host_bytes(self, routed_expert_bytes: int) -> int | None:
        """The host budget for stored experts in bytes (None = unlimited)."""
        if self.host_mem_bytes is not None:
            return int(self.host_mem_bytes)
        if self.host_mem_fraction is not None:
            return int(self.host_mem_fraction * routed_expert_bytes)
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.per_layer_cache_slots is not None:
            d["per_layer_cache_slots"] = list(self.per_layer_cache_slots)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServingConfig":
        """Build from `to_dict()` output; unknown keys are an error naming the valid ones."""
        if not isinstance(d, dict):
            raise ConfigError(f"serving config: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"serving config: unknown field(s) {', '.join(unknown)}; valid fields: "
                              f"{', '.join(sorted(names))}")
        d = dict(d)
        if d.get("per_layer_cache_slots") is not None:
            d["per_layer_cache_slots"] = tuple(d["per_layer_cache_slots"])
        return cls(**d)


def parse_prefetch(text: str) -> tuple[str, float]:
    """Parse `none`, `oracle` or `next:ACC` (ACC in [0, 1]) into (mode, accuracy)."""
    s = str(text).strip().lower()
    if s == "none":
        return "none", 0.0
    if s == "oracle":
        return "oracle", 1.0
    if s.startswith("next"):
        acc_text = s[5:] if s.startswith("next:") else ("1" if s == "next" else "")
        try:
            acc = float(acc_text)
        except ValueError:
            acc = float("nan")
        if math.isfinite(acc) and 0.0 <= acc <= 1.0:
            return "next", acc
    raise ConfigError(f"prefetch: {text!r} is not valid; use none, oracle or next:ACC with ACC in "
                      f"[0, 1] (e.g. next:0.8)")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"serving config: {name} is {value!r}; choose one of {', '.join(choices)}")


def _check_budget(name: str, nbytes: int | None, fraction: float | None) -> None:
    if nbytes is not None and fraction is not None:
        raise ConfigError(f"serving config: give {name}_bytes or {name}_fraction, not both")
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 0):
        raise ConfigError(f"serving config: {name}_bytes is {nbytes!r}; expected bytes >= 0")
    if fraction is not None and not (0.0 <= fraction <= 1.0):
        raise ConfigError(f"serving config: {name}_fraction is {fraction!r}; expected 0..1")


# The KV cache is kept in bf16. Multi-head latent attention (DeepSeek-V2/V3, Moonlight) caches one
# latent (kv_lora_rank 512) + the rope key (64) per layer and token instead of per-head K and V.
KV_DTYPE_BYTES = 2
MLA_ARCHITECTURES = {"deepseek_v2": 512 + 64, "deepseek_v3": 512 + 64}


def kv_bytes_per_token(g: Any) -> int:
    """KV-cache bytes one token adds over all layers (bf16)."""
    mla = MLA_ARCHITECTURES.get(getattr(g, "architecture", ""))
    if mla is not None:
        return int(g.num_layers * mla * KV_DTYPE_BYTES)
    # K and V, every layer: 2 * layers * kv_heads * head_dim values of KV_DTYPE_BYTES bytes
    return int(2 * g.num_layers * g.num_key_value_heads * g.head_dim * KV_DTYPE_BYTES)


@dataclass(frozen=True)
class GpuSplit:
    """A GPU budget split into its fixed parts and what is left for the expert cache."""

    budget_bytes: float | None       # None: unlimited
    non_expert_bytes: int
    kv_cache_bytes: int
    staging_bytes: int
    cache_capacity_bytes: float      # inf when the budget is unlimited


def split_gpu_budget(geometry: Any, serving: "ServingConfig", staging_expert_bytes: int) -> GpuSplit:
    """Resolve the GPU budget and subtract the non-expert weights, KV cache and staging buffers.

    The simulator and the real runtime both call this, so their expert caches have one capacity.

    Args:
        geometry: a `ModelGeometry` (or anything with its fields).
        serving: budgets, batch, prompt and generated tokens, staging slots.
        staging_expert_bytes: bytes of one staging buffer (one uncompressed expert).

    Raises:
        ConfigError: the budget cannot hold the non-expert weights, KV cache and staging buffers.
    """
    non_expert = int(geometry.non_expert_bytes)
    # [batch, prompt + generated] tokens, each adding kv_bytes_per_token over all layers
    kv = kv_bytes_per_token(geometry) * serving.batch_size * (
        serving.prompt_tokens + serving.generated_tokens)
    staging = serving.staging_slots * int(staging_expert_bytes)
    routed = int(len(geometry.moe_layers) * geometry.experts_per_layer * geometry.bytes_per_expert)
    budget = serving.resolve_gpu_bytes(non_expert, kv, routed)
    if budget is None:
        return GpuSplit(None, non_expert, int(kv), staging, float("inf"))
    cap = budget - non_expert - kv - staging
    if cap < 0:
        raise ConfigError(
            f"GPU budget {format_bytes(budget)} is below the non-expert weights "
            f"({format_bytes(non_expert)}) + KV cache ({format_bytes(kv)}) + "
            f"{serving.staging_slots} staging buffers ({format_bytes(staging)}) = "
            f"{format_bytes(non_expert + kv + staging)}; raise --gpu-mem")
    return GpuSplit(budget, non_expert, int(kv), staging, cap)
