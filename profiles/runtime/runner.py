"""`measure_throughput`: serve a model with the offloaded runtime and measure it.

    from profiles.runtime import measure_throughput
    r = measure_throughput("packed_dir", serving=ServingConfig(gpu_mem_fraction=0.25,
                           prompt_tokens=16, generated_tokens=64))
    r.tokens_per_s, r.tpot_s, r.bytes_h2d, r.hit_rate       # measured

The model is a packed-checkpoint directory, a model spec (`builtin`, a checkpoint directory) with
a policy, or a `LoadedModel` with a policy (its experts are encoded in memory, and its own expert
modules are put back afterwards). A warm-up pass of the same workload runs first: it compiles the
decode kernels, records the routing (static-hot takes its hot experts from it, `oracle` prefetch
replays it), and is not measured; the cache and the counters are reset before the measured pass.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from profiles.errors import ConfigError
from profiles.runtime.engine import OffloadedRuntime
from profiles.runtime.generate import greedy_generate, synthetic_prompt
from profiles.runtime.results import RunResult, tensor_list
from profiles.runtime.store import ExpertStore
from profiles.runtime.timeline import busy_s, overlap_s
from profiles.serving import ServingConfig

Progress = Callable[[int, int, str], None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The runtime's device: `cuda[:N]` or `cpu` (None: cuda when present).

    Raises:
        ConfigError: another device type, or cuda on a machine without a CUDA GPU.
    """
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"--device {device!r} is not supported; choose cuda or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return dev


def open_model(model: Any, policy=None, device: torch.device | None = None,
               trust_remote_code: bool = False, progress: Progress | None = None,
               pinned: bool = True, store: ExpertStore | None = None,
               serving: ServingConfig | None = None, read_method: str = "direct"):
    """Resolve `model` to (transformers model, expert map, geometry, store, label, policy,
    keep_originals, tokenizer). `arch:`/`preset:` specs build a random-weight model
    (`random_model`) on the device. A packed directory whose records exceed `serving`'s host
    budget is served from disk (`DiskRecords`).

    Raises:
        PolicyError: the policy was made for another model, or differs from a packed one.
        PackedError: a corrupt packed checkpoint.
    """
    from profiles.models import LoadedModel, load_model
    from profiles.packed import build_model, check_policy_matches, is_packed, read_packed, \
        load_tokenizer
    from profiles.policy import Policy
    from profiles.runtime.random_model import is_geometry_spec, random_model

    pin = pinned and (device or default_device()).type == "cuda"
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        if is_packed(model):
            ckpt = read_packed(model, verify=True)
            if policy is not None:
                check_policy_matches(ckpt, policy)
            m, emap = build_model(ckpt, trust_remote_code)
            host = None if serving is None else serving.resolve_host_bytes(
                ckpt.geometry.routed_expert_bytes)
            store = ExpertStore.from_packed(
                ckpt, pin=pin, host_budget_bytes=host,
                disk_depth=None if serving is None else serving.disk_depth,
                read_method=read_method)
            return (m, emap, ckpt.geometry, store, str(model), ckpt.policy, False,
                    load_tokenizer(ckpt.path, trust_remote_code))
        if is_geometry_spec(str(model)):
            model = random_model(str(model), device or default_device())
        else:
            model = load_model(str(model), trust_remote_code=trust_remote_code)
    if not isinstance(model, LoadedModel):
        raise ConfigError(f"model {model!r}: expected a packed directory, a model spec or a "
                          f"LoadedModel")
    if store is not None:
        policy = store.policy
        from profiles.models.fingerprint import check_fingerprint

        check_fingerprint(store.fingerprint, model.fingerprint, f"expert store {store.source}")
    else:
        policy = policy if policy is not None else Policy.none(model.fingerprint)
        dev = device or default_device()
        store = ExpertStore.from_loaded(model, policy, pin=pin, progress=progress,
                                        encode_device=dev if dev.type == "cuda" else None)
    return (model.model, model.expert_map, model.geometry, store, model.spec, policy, True,
            model.tokenizer)


def measure_throughput(model: Any, policy=None, serving: ServingConfig = ServingConfig(), *,
                       device: str | torch.device | None = None,
                       prompt_ids: torch.Tensor | None = None, seed: int = 0,
                       warmup: bool = True, warm_cache: bool = False,
                       record_logits: bool = False,
                       trust_remote_code: bool = False, store: ExpertStore | None = None,
                       placement_traces: str | None = None,
                       progress: Progress | None = None,
                       read_method: str = "direct") -> RunResult:
    """Generate with the offloaded runtime and measure throughput, traffic and cache behaviour.

    Args:
        model: a packed-checkpoint directory, a model spec (`builtin`, a checkpoint directory, or
            `arch:…`/`preset:…` for random weights of that geometry), or a `LoadedModel`.
        policy: the storage `Policy` (default: the packed one, or no compression).
        serving: budgets, cache, prefetch, on-miss, batch, prompt and generated tokens.
        device: `cuda` or `cpu` (default: cuda when available).
        prompt_ids: [batch, prompt] token ids (default: seeded random ids of the configured
            batch and prompt length); they override `serving`'s batch and prompt tokens.
        seed: seeds the synthetic prompt.
        warmup: run the workload once unmeasured first (always done for static-hot and oracle).
        warm_cache: keep what the warm-up left in the cache (a calibration run: with an unlimited
            budget every expert then hits and the run times compute alone); default: cold start.
        record_logits: keep each step's logits in `RunResult.logits` (tests).
        store: an `ExpertStore` already encoded for this `LoadedModel` (its policy is used), to
            serve one model under several configurations without encoding it again.
        placement_traces: a routing-trace file whose decode activations rank the experts
            static-hot pins (`profiles.traces.placement_counts`, as the simulator ranks them);
            default: this run's own warm-up routing (an oracle).
        progress: `progress(done, total, label)` while encoding experts and per generated step.
        read_method: the disk tier's reads (a packed directory under a host budget): `direct`
            (O_DIRECT, the default), `fadvise` (drop each record's pages after reading it) or
            `cached` (through the page cache) — `profiles.packed.read.RecordFiles`.

    Returns:
        The measured `RunResult`.

    Raises:
        ConfigError: an impossible budget, an unknown device, a prompt of length 0.
        PolicyError / PackedError: see `open_model`.
    """
    dev = resolve_device(device)
    opened = store is None
    m, emap, geometry, store, label, policy, keep, _ = open_model(
        model, policy, dev, trust_remote_code, progress, pinned=serving.pinned, store=store,
        serving=serving, read_method=read_method)
    try:
        return _measure(m, emap, geometry, store, label, policy, keep, serving, dev, prompt_ids,
                        seed, warmup, warm_cache, record_logits, placement_traces, progress)
    finally:
        if opened and store.on_disk:   # the disk tier this call opened: its read pool and files
            store.records.close()


def _measure(m, emap, geometry, store, label, policy, keep, serving, dev, prompt_ids, seed,
             warmup, warm_cache, record_logits, placement_traces, progress) -> RunResult:
    if prompt_ids is not None:
        serving = replace(serving, batch_size=int(prompt_ids.shape[0]),
                          prompt_tokens=int(prompt_ids.shape[1]))
    if serving.prompt_tokens < 1:
        raise ConfigError("prompt tokens is 0; the runtime needs a prompt of at least 1 token")
    ids = prompt_ids if prompt_ids is not None else synthetic_prompt(
        serving.batch_size, serving.prompt_tokens, geometry.vocab_size, seed)
    placed = (_placement_order(placement_traces, geometry) if placement_traces is not None
              else None)  # read and checked before any generation
    rt = OffloadedRuntime(m, emap, geometry, store, serving, dev, keep_originals=keep)
    rt.install()
    try:
        ids = ids.to(dev)
        steps = serving.generated_tokens
        needs_record = serving.cache_policy == "static-hot" or rt.mode == "oracle"
        if warmup or needs_record or warm_cache:
            greedy_generate(m, ids, steps, on_step=rt.begin_step)
            rt.hot, rt.oracle = rt.hot_order(), rt.routing_by_step()
            if placed is not None:  # static-hot runs a warm-up, so this always applies
                rt.hot = placed
            rt.reset(keep_cache=warm_cache)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        total = steps + 1

        def on_step(phase: str, step: int) -> None:
            rt.begin_step(phase, step)
            if progress is not None and step:
                progress(step, total - 1, f"{phase} step {step}")

        gen = greedy_generate(m, ids, steps, on_step=on_step, record_logits=record_logits)
        result = _result(rt, gen, label, policy, dev, serving)
        if placement_traces is not None:
            result = replace(result, placement_traces=str(placement_traces), notes=result.notes + (
                f"static placements ranked by the decode activations of {placement_traces}",))
        if warm_cache:
            result = replace(result, notes=result.notes + (
                "calibration run: the cache kept what the warm-up pass left in it",))
        return result
    finally:
        rt.uninstall()


def _placement_order(path, geometry) -> list:
    """(layer, expert) keys by the placement traces' decode activations, most first; ties by
    position (the order the simulator's `Workload.hot_order` gives for the same counts)."""
    from profiles.traces import placement_counts, read_traces

    E = geometry.experts_per_layer
    counts = placement_counts(read_traces(path), geometry.moe_layers, E, str(path))
    flat = np.lexsort((np.arange(counts.size), -counts.ravel()))
    return [(geometry.moe_layers[int(i // E)], int(i % E)) for i in flat]


def _result(rt: OffloadedRuntime, gen, label: str, policy, dev, serving) -> RunResult:
    spans = rt.timeline.spans()
    t0 = rt.timeline._t0
    marks = [(phase, a - t0, b - t0) for phase, a, b in gen.marks]
    spans = sorted(spans + [("steps", ("step", p), a, b) for p, a, b in marks],
                   key=lambda s: s[2])
    end = marks[-1][2]
    prefill_end = marks[0][2]
    decode = marks[1:]
    steps = len(decode)
    B = serving.batch_size
    decode_s = end - prefill_end
    link_busy = busy_s(spans, "H2D link")
    moved = sum(s[1].nbytes for s in spans if s[0] == "H2D link")
    dec_busy = busy_s(spans, "GPU decode")
    (dh, dm), (ph, pm) = rt.hm["decode"], rt.hm["prefill"]
    st = rt.stats
    cap = rt.budget.cache_capacity_bytes
    notes = []
    if rt.mode == "next":
        notes.append("prefetch next: the next layer's router applied to this layer's input "
                     "(router lookahead); its accuracy is measured, the configured ACC is unused")
    if dev.type == "cuda" and rt.mode != "none":
        notes.append("prefetch copies share the copy stream with demand copies in issue order "
                     "(a CUDA stream cannot reorder them; the simulator lets demand go first)")
    infos = rt.store.infos()
    if any(not r.device_decodable for r in infos.values()):
        notes.append("experts with host codecs were decoded on CPU worker threads and sent raw")
    routing = [(phase, [(rt.layers[li], pair) for li, pair in enumerate(layers)])
               for phase, layers in rt.routing]
    sizes = {k: (r.stored_nbytes, r.link_nbytes, rt.resident_bytes[k])
             for k, r in infos.items()}
    disk_busy = busy_s(spans, "SSD read")
    if rt.store.on_disk:
        d = rt.store.records
        how = {"direct": "O_DIRECT, bypassing the page cache",
               "fadvise": "each record's pages dropped from the page cache after its read",
               "cached": "through the page cache"}[d.read_method]
        notes.append(f"disk tier: {d.reads} expert records read from {rt.store.source} "
                     f"({d.read_bytes} bytes, measured), at most {d.peak} bytes held in host "
                     f"memory; {d.depth} reads in flight, {how}")
        serving = replace(serving, disk_depth=d.depth)
    return RunResult(
        model=label, policy=_describe_policy(policy), device=str(dev), batch_size=B,
        prompt_tokens=serving.prompt_tokens, steps=steps, tokens=B * steps, time_s=end,
        prefill_s=marks[0][2] - marks[0][1], decode_s=decode_s,
        tokens_per_s=B * steps / decode_s if decode_s > 0 else float("inf"),
        tpot_s=decode_s / steps if steps else 0.0, ttft_s=decode[0][2] if decode else end,
        bytes_h2d=st["bytes_h2d"], bytes_h2d_prefetch=st["bytes_h2d_prefetch"],
        transfers=st["transfers"], cpu_expert_runs=st["cpu_runs"], hits=dh, misses=dm,
        hit_rate=dh / (dh + dm) if dh + dm else 0.0, prefill_hits=ph, prefill_misses=pm,
        prefill_hit_rate=ph / (ph + pm) if ph + pm else 0.0,
        prefetch_accuracy=st["pred_hit"] / st["pred_total"] if st["pred_total"] else None,
        link_achieved_gbps=moved / link_busy / 1e9 if link_busy > 0 else None,
        link_busy_fraction=link_busy / end if end > 0 else 0.0,
        decode_busy_fraction=dec_busy / end if end > 0 else 0.0,
        decode_overlap_fraction=overlap_s(spans, "GPU decode", "H2D link") / dec_busy
        if dec_busy > 0 else None,
        compute_busy_fraction=busy_s(spans, "GPU compute") / end if end > 0 else 0.0,
        cpu_decode_busy_fraction=busy_s(spans, "CPU decode") / end if end > 0 else 0.0,
        gpu_budget_bytes=rt.budget.gpu_budget_bytes,
        cache_capacity_bytes=None if cap == float("inf") else float(cap),
        cache_peak_bytes=int(rt.cache_peak), resident_peak_bytes=int(rt.resident_peak),
        kv_cache_bytes=rt.budget.kv_bytes, staging_bytes=rt.budget.staging_bytes,
        # the disk tier's is what its LRU held at most (measured), not its budget
        host_expert_bytes=rt.store.records.peak if rt.store.on_disk else rt.store.host_bytes,
        bytes_disk=rt.store.records.read_bytes if rt.store.on_disk else 0,
        disk_reads=rt.store.records.reads if rt.store.on_disk else 0,
        disk_busy_fraction=disk_busy / end if end > 0 else 0.0,
        preload_bytes=st["preload_bytes"],
        device_peak_bytes=(int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda"
                           else None),
        output_ids=tensor_list(gen.ids), config=serving.to_dict(), notes=tuple(notes),
        spans=spans, routing=routing, fetches=list(rt.fetch_log), expert_sizes=sizes,
        logits=gen.logits, geometry=rt.geometry, storage_policy=policy)


def _describe_policy(policy) -> str:
    specs = {s.describe() for s in policy.all_specs()}
    if not policy.layers and not policy.experts and all(
            key[:2] == (None, None) for key in policy.matrices):
        return policy.expert_specs(-1, -1).describe()   # one spec per matrix everywhere
    if len(specs) == 1:
        return next(iter(specs))
    kind = "per-matrix" if policy.per_matrix else "per-layer"
    return f"{kind} policy ({len(specs)} storage specs)"
