"""The offloaded runtime: a transformers MoE model whose routed experts wait in host memory.

`OffloadedRuntime.install()` replaces the experts module of every MoE layer with an
`OffloadedExperts` module. Per forward pass and MoE layer it receives the router's choice
(`top_k_index`, `top_k_weights`) and, as the simulator does (`sim/engine.py`):

1. takes the union of the selected experts; each is a hit if the expert cache (a
   `profiles.cache` policy: LRU, LFU, static-hot, optionally per layer) holds it, or if it was
   staged for this layer;
2. starts a fetch for every miss (copy + decode, `profiles.runtime.transfers`) — or, with
   `on_miss="cpu"`, runs the missed expert on the CPU (and, for LRU/LFU, fetches it in the
   background);
3. prefetches the next MoE layer's predicted experts: `next:*` applies the next layer's router to
   this layer's input (the router-lookahead predictor of MoE-Infinity and Pre-gated MoE; its
   measured accuracy is reported), `oracle` replays the routing of a recording pass;
4. computes hits at once and misses as they arrive, inserting arrivals into the cache (evicting as
   the policy says; an expert the policy does not admit is used from a staging buffer and dropped);
5. sums the experts' outputs in ascending expert order, as transformers' own loop does.

Each expert is computed by a one-expert "shell" of the model's own experts module
(`profiles.runtime.surgery`), so any fused-experts architecture of transformers 5 computes exactly
its own expert function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from profiles.cache import ExpertCache, PerLayerCache, make_cache
from profiles.errors import ConfigError
from profiles.runtime import routing
from profiles.runtime.memory import DeviceBudget, device_budget
from profiles.runtime.store import ExpertStore
from profiles.runtime.surgery import restore_experts, swap_experts, timing_hooks
from profiles.runtime.timeline import Computed, Job, Timeline
from profiles.runtime.transfers import FetchJob, Transfers
from profiles.serving import ServingConfig

Key = tuple[int, int]


class _Resident(dict):
    """(layer, expert) -> the resident expert's reference, with `held`: the bytes of the tensor
    storages those references hold, measured from the tensors as each is added (kept up to date
    on every add and removal, so a miss costs the same whatever the cache holds)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0
        self._bytes: dict[Key, int] = {}

    @staticmethod
    def _storage_bytes(ref: tuple[str, Any]) -> int:
        kind, data = ref
        tensors = [data[0]] if kind == "payload" else list(data.values())
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in tensors}.values())

    def __setitem__(self, key: Key, ref: tuple[str, Any]) -> None:
        self.pop(key, None)
        n = self._storage_bytes(ref)
        self._bytes[key] = n
        self.held += n
        super().__setitem__(key, ref)

    def pop(self, key: Key, *default):
        if key in self:
            self.held -= self._bytes.pop(key)
        return super().pop(key, *default)


class OffloadedRuntime:
    """Serve `model` with its routed experts in `store`, under `serving`, on `device`.

    Args:
        model: the transformers model (its non-expert weights are moved to `device`).
        expert_map: the model's `ExpertMap` (fused experts modules, routers).
        geometry: its `ModelGeometry` (for the memory budget).
        store: the experts as host records (`ExpertStore`).
        serving: the serving configuration shared with the simulator.
        device: where the model runs (`cuda` or `cpu`).
        keep_originals: keep the replaced experts modules so `uninstall()` can restore them.
    """

    def __init__(self, model, expert_map, geometry, store: ExpertStore, serving: ServingConfig,
                 device: str | torch.device = "cpu", keep_originals: bool = True) -> None:
        if serving.host_budget.bytes is not None or serving.host_budget.fraction is not None:
            host = serving.resolve_host_bytes(geometry.routed_expert_bytes)
            if host is not None and host < store.host_bytes and not store.on_disk:
                raise ConfigError(f"--host-mem {serving.host_budget} is smaller than the packed "
                                  f"experts ({store.host_bytes} bytes), which were encoded in "
                                  f"memory; pack the model (`moesz pack`) and run the packed "
                                  f"directory to read experts from disk, or raise --host-mem")
        self.model, self.emap, self.geometry, self.store = model, expert_map, geometry, store
        self.serving = serving
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but no CUDA GPU is visible; use cpu")
        self.keep_originals = keep_originals
        self.layers = tuple(expert_map.moe_layers)
        self.pos = {layer: i for i, layer in enumerate(self.layers)}
        store.check_model(self.layers, expert_map.experts_per_layer)
        self.compressed = serving.resident_form == "compressed"
        self.infos = store.infos()
        self.resident_bytes = {k: self._resident_nbytes(r) for k, r in self.infos.items()}
        self.budget: DeviceBudget = device_budget(geometry, serving, self.resident_bytes)
        self.timeline = Timeline(self.device)
        self.transfers = Transfers(self.device, self.timeline, serving.gpu_decode,
                                   serving.cpu_workers)
        self.mode, _ = serving.prefetch_mode
        self.oracle: list[list[tuple[int, ...]]] | None = None  # [step][layer pos] experts
        self.hot: list[Key] | None = None
        self._installed = False
        self._home = self.device
        self._originals: dict[int, nn.Module] = {}
        self._hooks: list = []
        self._shells: dict[int, nn.Module] = {}
        self.reset()

    # -- setup -------------------------------------------------------------------------------
    def _resident_nbytes(self, r) -> int:
        """Device bytes of a cached expert: its record when held compressed (or raw, whose
        tensors view the record), else its decoded tensors."""
        if not r.device_decodable:
            return r.original_nbytes
        if r.codecs == ("raw",) or self.compressed:
            return r.stored_nbytes
        return r.original_nbytes

    def install(self) -> "OffloadedRuntime":
        """Swap in the offloaded experts modules, add timing hooks, move the model to the device."""
        if self._installed:
            return self
        first = next(self.model.parameters(), None)
        self._home = first.device if first is not None else self.device
        self._shells, originals = swap_experts(self.model, self.emap, self)
        self._originals = originals if self.keep_originals else {}
        self._hooks = timing_hooks(self.model, self.emap, self._begin_attention,
                                   self._end_attention)
        self.model.to(self.device)
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Put the original experts modules back (if kept) and remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        restore_experts(self.model, self._originals)
        if self._originals and self._home != self.device:
            self.model.to(self._home)       # back where the caller had it, experts included
        self._originals = {}
        self.transfers.close()
        self._installed = False

    def __enter__(self) -> "OffloadedRuntime":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def reset(self, keep_cache: bool = False) -> None:
        """Drop statistics and the timeline (between warm-up and a run); unless `keep_cache`, also
        empty the cache and drop resident experts (a cold start, as the simulator begins)."""
        if self.store.on_disk:
            self.store.records.timeline = self.timeline
        s = self.serving
        if not keep_cache:
            hot = [(k, self.resident_bytes[k]) for k in (self.hot or [])]
            if self.budget.layer_capacity_bytes is not None:
                self.cache: ExpertCache = PerLayerCache(
                    s.cache_policy, self.budget.layer_capacity_bytes, hot)
            else:
                self.cache = make_cache(s.cache_policy, self.budget.cache_capacity_bytes, hot)
            self.resident: _Resident = _Resident()
            self.inflight: dict[Key, FetchJob] = {}
            self.staged: dict[int, dict[Key, tuple[str, Any]]] = {
                li: {} for li in range(len(self.layers))}
        self.cache.hits = self.cache.misses = 0
        self.predicted: dict[int, set[int]] = {}
        self.stats = dict(bytes_h2d=0, bytes_h2d_prefetch=0, transfers=0, cpu_runs=0,
                          pred_hit=0, pred_total=0, preload_bytes=0)
        self.hm = {"prefill": [0, 0], "decode": [0, 0]}
        self.fetch_log: list[tuple[Key, str, int]] = []
        self.routing: list[tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        self.cache_peak = 0
        self.resident_peak = 0
        self.phase, self.step = "prefill", 0
        self._attn: dict[int, Any] = {}
        if not keep_cache:
            self._preload()
        if self.store.on_disk:  # the disk tier counts the measured pass alone
            d = self.store.records
            if not keep_cache:
                d.clear()       # a cold host tier too (static-hot's pins are on the device), as
            d.reads = d.read_bytes = 0  # the simulation starts
            d.peak = d.held
        self.timeline.reset()

    def _preload(self) -> None:
        """static-hot: make the pinned experts resident before the run (not counted as traffic)."""
        preload = getattr(self.cache, "preload", None)
        if preload is None:
            return
        for key, _ in preload():
            job = self.transfers.fetch(self.store[key], "preload", self.compressed)
            job.wait()
            self.resident[key] = self._ref(job)
            self.stats["preload_bytes"] += self.store[key].link_nbytes
        self._note_resident()

    # -- per step ------------------------------------------------------------------------------
    def begin_step(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step
        self.routing.append((phase, []))

    def _begin_attention(self, layer: int) -> None:
        self._attn[layer] = self.timeline.begin()

    def _end_attention(self, layer: int) -> None:
        mark = self._attn.pop(layer, None)
        if mark is not None:
            item = ("lm_head", -1) if layer == -1 else ("attention", layer)
            self.timeline.end(mark, "GPU compute", item)

    # -- one MoE layer -------------------------------------------------------------------------
    def moe_forward(self, layer: int, h: torch.Tensor, idx: torch.Tensor,
                    w: torch.Tensor) -> torch.Tensor:
        self._end_attention(layer)
        li = self.pos[layer]
        idx_cpu = idx.detach().to("cpu")
        if not self.routing:
            self.routing.append((self.phase, []))
        self.routing[-1][1].append((idx_cpu, w.detach().float().to("cpu")))
        # the simulator's order: rank order for one token, ascending for a union (sim/workload.py)
        experts = (idx_cpu[0].tolist() if idx_cpu.shape[0] == 1
                   else torch.unique(idx_cpu).tolist())
        self._score_prediction(li, experts)
        self._collect_arrivals()
        hm = self.hm[self.phase]
        hits: dict[int, tuple[str, Any]] = {}
        misses: list[int] = []
        for e in experts:
            key = (layer, e)
            if self.cache.access(key) or key in self.staged[li]:
                hm[0] += 1
                hits[e] = self.resident.get(key) or self.staged[li][key]
            else:
                hm[1] += 1
                misses.append(e)
        cpu_miss = self.serving.on_miss == "cpu"
        for e in misses:
            key = (layer, e)
            if cpu_miss:
                if self.serving.cache_policy != "static-hot" and key not in self.inflight:
                    self._fetch(key, "prefetch")   # background copy for later hits
            elif key not in self.inflight:
                self._fetch(key, "fetch")
        if self.mode != "none" and li + 1 < len(self.layers):
            self._prefetch(li + 1, h)
        rows = self._token_rows(idx_cpu, experts, h.device)
        outs = {}
        for e, ref in hits.items():
            outs[e] = self._compute((layer, e), ref, h, w, rows[e])
        for e in misses:
            key = (layer, e)
            if cpu_miss:
                outs[e] = self._cpu_run(key, h, w, rows[e])
            else:
                outs[e] = self._compute(key, self._arrive(self.inflight[key], wait=True), h, w,
                                        rows[e])
        final = torch.zeros_like(h)
        for e in sorted(experts):   # transformers' accumulation order
            final.index_add_(0, rows[e][0], outs[e].to(final.dtype))
        self.staged[li].clear()
        return final

    def _token_rows(self, idx_cpu: torch.Tensor, experts: list[int], device) -> dict:
        """Per expert: (token rows, top-k slots) in transformers' order (slot-major, then token)."""
        pieces, bounds = [], {}
        start = 0
        for e in experts:
            pos, tok = torch.where(idx_cpu.T == e)
            pieces.append(torch.stack([tok, pos]))
            bounds[e] = (start, start + tok.numel())
            start += tok.numel()
        both = torch.cat(pieces, dim=1).to(device)
        return {e: (both[0, a:b], both[1, a:b]) for e, (a, b) in bounds.items()}

    def _compute(self, key: Key, ref: tuple[str, Any], h, w, rows) -> torch.Tensor:
        """One expert on the device: decode first if it is held compressed."""
        kind, data = ref
        if kind == "payload":      # held compressed: decode on every use (the record's blob
            buf, copied, record = data  # headers came with it: no second read from disk)
            weights, ready = self.transfers.decode(record, buf, Job("use", key), copied)
            if ready is not None:
                cur = torch.cuda.current_stream(self.device)
                cur.wait_event(ready)
                for t in weights.values():
                    t.record_stream(cur)
        else:
            weights = data
        mark = self.timeline.begin()
        out = self._run_shell(key[0], weights, h, w, rows)
        self.timeline.end(mark, "GPU compute", Computed(key, int(rows[0].numel())))
        return out

    def _run_shell(self, layer: int, weights: dict, h, w, rows) -> torch.Tensor:
        tok, pos = rows
        shell = self._shells[layer]
        shell._buffers.update({n: t.unsqueeze(0) for n, t in weights.items()})
        n = tok.numel()
        out = shell(h.index_select(0, tok), torch.zeros(n, 1, dtype=torch.long, device=h.device),
                    w[tok, pos].unsqueeze(1))
        for name in weights:
            shell._buffers.pop(name)
        return out

    def _host_record(self, key: Key):
        """The expert's host record: the one its fetch in flight holds or is reading from disk
        (a record is read once, as the simulator counts it, even if the layer's other reads have
        since pushed it out of the disk tier's host LRU), else the store's."""
        job = self.inflight.get(key)
        if job is not None and job.record is not None:
            return job.record
        if job is not None and job.reading is not None:
            return job.reading.result()
        return self.store[key]

    def _cpu_run(self, key: Key, h, w, rows) -> torch.Tensor:
        """A missed expert computed on the CPU (decoded there from its host record)."""
        self.stats["cpu_runs"] += 1
        weights = self.transfers.host_weights(self._host_record(key), Job("cpu", key))
        cpu = torch.device("cpu")
        tok, pos = rows
        h_c, w_c = h.to(cpu), w.to(cpu)
        t0 = self.timeline.now()
        out = self._run_shell(key[0], weights, h_c, w_c, (tok.to(cpu), pos.to(cpu)))
        self.timeline.host("CPU compute", Job("cpu", key), t0, self.timeline.now())
        return out.to(h.device)

    # -- fetching and arrivals -----------------------------------------------------------------
    def _fetch(self, key: Key, kind: str) -> FetchJob:
        rec = self.infos[key]
        disk = self.store.records if self.store.on_disk else None
        if disk is not None and not disk.held_in_memory(key):
            # read on the disk pool (up to its depth in flight); copied once the read is done
            job = self.transfers.fetch_after_read(key, disk.request(key), kind)
        else:
            job = self.transfers.fetch(self.store[key], kind, self.compressed)
        self.inflight[key] = job
        self.stats["bytes_h2d"] += rec.link_nbytes
        self.stats["transfers"] += 1
        if kind == "prefetch":
            self.stats["bytes_h2d_prefetch"] += rec.link_nbytes
        self.fetch_log.append((key, kind, rec.link_nbytes))
        return job

    @staticmethod
    def _ref(job: FetchJob) -> tuple[str, Any]:
        if job.payload is not None:
            return ("payload", (job.payload, job.ready, job.record))
        return ("weights", job.weights)

    def _arrive(self, job: FetchJob, wait: bool = False) -> tuple[str, Any]:
        """Make an arrived expert resident (or staged) as the simulator's `_arrive` does."""
        del self.inflight[job.key]
        self.transfers.complete(job, self.compressed)
        if wait or job.future is not None:
            job.wait(torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None)
        ref = self._ref(job)
        if self.device.type == "cuda":
            cur = torch.cuda.current_stream(self.device)
            for t in ([job.payload] if job.payload is not None else job.weights.values()):
                t.record_stream(cur)
        key = job.key
        for old in self.cache.insert(key, self.resident_bytes[key]):
            self.resident.pop(old, None)
        if key in self.cache:
            self.resident[key] = ref
        else:
            self.staged[self.pos[key[0]]][key] = ref
        self._note_resident()
        return ref

    def _collect_arrivals(self) -> None:
        for job in list(self.inflight.values()):
            if job.reading is not None and job.reading.done():
                self.transfers.complete(job, self.compressed)   # read done: copy it now
        for job in [j for j in self.inflight.values() if j.done()]:
            self._arrive(job)

    def _note_resident(self) -> None:
        """Track the cache's bytes and, measured from the tensors held, the resident bytes."""
        self.cache_peak = max(self.cache_peak, self.cache.used_bytes)
        self.resident_peak = max(self.resident_peak, self.resident.held)

    # -- prefetch ------------------------------------------------------------------------------
    def _prefetch(self, next_pos: int, h: torch.Tensor) -> None:
        layer = self.layers[next_pos]
        if self.mode == "oracle":
            predicted = set(self.oracle[self.step][next_pos]) if self.oracle else set()
        else:
            predicted = routing.router_lookahead(self.emap.routers.get(layer), h,
                                                 self.emap.top_k)
        self.predicted[next_pos] = predicted
        staged = self.staged[next_pos]
        for e in sorted(predicted):
            key = (layer, e)
            if key not in self.cache and key not in self.inflight and key not in staged:
                self._fetch(key, "prefetch")

    def _score_prediction(self, li: int, actual: list[int]) -> None:
        predicted = self.predicted.pop(li, None)
        if predicted is not None:
            self.stats["pred_hit"] += len(predicted & set(actual))
            self.stats["pred_total"] += len(actual)

    # -- routing ---------------------------------------------------------------------------
    def hot_order(self) -> list[Key]:
        return routing.hot_order(self.routing, self.layers, self.emap.experts_per_layer)

    def routing_by_step(self) -> list[list[tuple[int, ...]]]:
        return routing.routing_by_step(self.routing)
