"""The discrete-event simulation (simpy) of an offloaded MoE model's forward passes.

Per step (a prefill of the whole batch, or one decode token for every sequence) and decoder
layer: attention + router on the GPU compute stream; then, for an MoE layer, the union of the
batch's experts. A resident expert is computed at once (after a decode when it is held
compressed). A missing one is fetched: read from SSD if it is not in host memory, decoded by CPU
workers for CPU codecs, copied over the host-to-device link (one copy engine), decoded on the
GPU (its own stream, or in line on the compute stream), inserted into the cache, then computed.
Transfers of later experts overlap decode and compute of earlier ones (pipelining); the first
demand miss cannot start before the router, so nothing hides it. With `on_miss = cpu`, missed
experts run on the CPU instead (and, for LRU/LFU, are copied to the GPU in the background).
Prefetches of the next MoE layer are issued after the router and yield to demand traffic;
concurrent requests for the same expert share one transfer. The layer ends when its last
expert is computed. Modelled after the structure of Vidur and LLMServingSim: profiled operator
times, simulated on the CPU; the simulator never calls the closed-form model.
"""

from __future__ import annotations

import gc
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import simpy
from simpy.events import Timeout

from profiles.cache import ExpertCache, PerLayerCache, make_cache
from profiles.errors import ConfigError
from profiles.hardware import HardwareProfile, LinkFit
from profiles.serving import ServingConfig
from sim.costs import CPU, GPU, ExpertCosts
from sim.memory import MemoryLayout, memory_layout
from sim.prefetch import make_prefetcher
from sim.results import SimResult
from sim.servers import DEMAND, PREFETCH, URGENT, Recorder, Server, Track
from sim.timing import TimeModel
from sim.workload import Workload


@dataclass(frozen=True)
class SimOptions:
    """Simulator-only knobs (the serving configuration is shared with the runtime).

    Attributes:
        seed: seeds the prefetch predictor's errors.
        pipeline: overlap transfers with decode and compute (False: one expert at a time).
        record: keep the per-event timeline for Chrome-trace and Gantt export.
        ssd_gbps, ssd_latency_s: override the hardware profile's disk read fit (and drop its
            depth curve: the override is one line, `latency + bytes / gbps` per read); the
            closed form takes the same override (`with_disk_override`).
    """

    seed: int = 0
    pipeline: bool = True
    record: bool = False
    ssd_gbps: float | None = None
    ssd_latency_s: float | None = None

    def __post_init__(self) -> None:
        if self.ssd_gbps is not None and not self.ssd_gbps > 0:
            raise ConfigError(f"--ssd-gbps is {self.ssd_gbps!r}; a link needs a bandwidth > 0 GB/s")
        if self.ssd_latency_s is not None and not self.ssd_latency_s >= 0:
            raise ConfigError(f"--ssd-latency-s is {self.ssd_latency_s!r}; expected seconds >= 0")


def with_disk_override(hardware: HardwareProfile, options: "SimOptions") -> HardwareProfile:
    """`hardware` with `options`' SSD overrides applied to its disk figures, so that the
    simulation and the closed form read the same disk (unchanged without overrides)."""
    if options.ssd_gbps is None and options.ssd_latency_s is None:
        return hardware
    from dataclasses import replace

    d = hardware.host.disk_read
    gbps = d.gbps if options.ssd_gbps is None else options.ssd_gbps
    lat = d.latency_s if options.ssd_latency_s is None else options.ssd_latency_s
    disk = LinkFit(lat, gbps, "estimated", f"override: --ssd-gbps {gbps:g}, --ssd-latency-s "
                   f"{lat:g} (one read at a time)")
    return replace(hardware, host=replace(hardware.host, disk_read=disk, disk_curve=None))


def disk_depth(hardware: HardwareProfile, serving: ServingConfig) -> int:
    """Reads in flight of the disk tier: the serving config's, else the profile's best depth;
    1 for a disk known only by its one-read-at-a-time line (`host.disk_read`), which says
    nothing of what more reads in flight would give."""
    if hardware.host.disk_curve is None:
        return 1
    return serving.disk_depth or hardware.host.disk_depth


class _Job:
    """An expert moving through stages (fetch: ssd, cpu decode, link, gpu decode; or use)."""

    __slots__ = ("kind", "key", "li", "e", "prio", "stages", "i", "waiters", "entry", "server",
                 "done")

    def __init__(self, kind: str, key: tuple[int, int], li: int, e: int, prio: int,
                 stages: tuple, done: Callable[["_Job"], None]) -> None:
        self.kind = kind
        self.key = key
        self.li = li
        self.e = e
        self.prio = prio
        self.stages = stages
        self.i = 0
        self.done = done
        self.waiters: list[Callable[[], None]] = []


class _Countdown:
    """Calls `then(None)` once `remaining` experts are done: `one(_)` = done now, `at(t)` = done
    at simulated time t (a booked compute span); the call comes at the latest of them."""

    __slots__ = ("env", "remaining", "then", "last")

    def __init__(self, env: simpy.Environment, n: int, then: Callable[[Any], None]) -> None:
        self.env = env
        self.remaining = n
        self.then = then
        self.last = env.now

    def one(self, _: Any) -> None:
        self.at(self.env.now)

    def at(self, t: float) -> None:
        if t > self.last:
            self.last = t
        self.remaining -= 1
        if self.remaining == 0:
            if self.last > self.env.now:
                Timeout(self.env, self.last - self.env.now).callbacks.append(self.then)
            else:
                self.then(None)


class _Sequence:
    """Non-pipelined layer: start each expert only when the previous one is done."""

    def __init__(self, env: simpy.Environment, items: list, start: Callable, then: Callable) -> None:
        self.env, self.items, self.start, self.then = env, items, start, then

    def one(self, _: Any = None) -> None:
        if self.items:
            e, n = self.items.pop(0)
            self.start(e, n, self)
        else:
            self.then(None)

    def at(self, t: float) -> None:
        Timeout(self.env, t - self.env.now).callbacks.append(self.one)


class Simulation:
    """One run: build with the inputs, call `run()` once."""

    def __init__(self, *, geometry: Any, hardware: HardwareProfile, serving: ServingConfig,
                 costs: ExpertCosts, workload: Workload, times: TimeModel | None = None,
                 options: SimOptions = SimOptions()) -> None:
        hardware = with_disk_override(hardware, options)
        self.g, self.hw, self.serving, self.costs, self.wl = geometry, hardware, serving, costs, workload
        self.opt = options
        self.times = times or TimeModel(hardware, geometry, serving.batch_size)
        if costs.shape != (len(geometry.moe_layers), geometry.experts_per_layer):
            raise ConfigError(f"expert costs have shape {costs.shape}; the model has "
                              f"{len(geometry.moe_layers)} MoE layers x {geometry.experts_per_layer} experts")
        self.mem: MemoryLayout = memory_layout(
            geometry, serving, costs, workload.hot_order(), hardware.gpu.memory_bytes.value)
        self.link: LinkFit = hardware.gpu.h2d(serving.pinned)
        self.serial = hardware.gpu.serial
        self.depth = disk_depth(hardware, serving)

    # -- setup -------------------------------------------------------------------------------
    def _build(self) -> None:
        env = self.env = simpy.Environment()
        rec = self.recorder = Recorder() if self.opt.record else None
        s = self.serving
        if self.serial:
            # the CPU device: copy, in-place decode and compute run one after another in the
            # model's thread, so they queue on one server (each keeps its own track)
            device = Server(env, "device (CPU)", 1, rec)
            self.compute, self.h2d = Track(device, "GPU compute"), Track(device, "H2D link")
            self.gpu_dec = Track(device, "GPU decode" if s.gpu_decode == "stream"
                                 else "GPU compute")
            self._booked = False
        else:
            self.compute = Server(env, "GPU compute", 1, rec)
            self.h2d = Server(env, "H2D link", 1, rec)
            self.gpu_dec = (Server(env, "GPU decode", 1, rec) if s.gpu_decode == "stream"
                            else self.compute)
            # With decompression on its own stream, the compute stream only ever runs demand
            # work in submission order, so its spans are booked (`Server.reserve`).
            self._booked = s.gpu_decode == "stream"
        # cpu_workers threads, each decoding a whole expert (see sim.costs)
        self.cpu_dec = Server(env, "CPU decode", s.cpu_workers, rec)
        # experts run on the CPU on a miss: on the CPU device, in the model's thread too
        self.cpu = (Track(device, "CPU compute") if self.serial
                    else Server(env, "CPU compute", 1, rec))
        self.ssd = Server(env, "SSD read", self.depth, rec)
        c, layers = self.costs, self.g.moe_layers
        L = len(layers)
        # per-expert stage durations as nested lists (fast scalar access in the event loop)
        self._link_s = [[self.link.time_s(float(b)) for b in row] for row in c.link_bytes]
        # on the CPU device, the runtime's own work per fetched expert (cache, bookkeeping) runs
        # in the model's thread: booked with the copy, or with a host-codec miss's lock share
        self._miss_s = self.times.miss_overhead_s if self.serial else 0.0
        self._host_miss_s = self.times.host_miss_overhead_s if self.serial else 0.0
        # and per record read from disk (handed back to it under Python's lock)
        self._read_s = self.times.disk_read_overhead_s if self.serial else 0.0
        self._handoff = Track(device, "disk handoff") if self._read_s > 0 else None
        # (and, for an expert decoded in place after its copy, the extra work of that decode)
        dmiss = self.times.decode_miss_overhead_s if self.serial else 0.0
        if self._miss_s > 0 or dmiss > 0:
            decoded = (c.decode_where == GPU) & (c.gpu_decode_s > 0)
            self._dev_link_s = [[v + self._miss_s + (dmiss if d else 0.0)
                                 for v, d in zip(row, drow)]
                                for row, drow in zip(self._link_s, decoded.tolist())]
        else:
            self._dev_link_s = self._link_s
        self._gdec = c.gpu_decode_s.tolist()
        self._cdec = c.cpu_decode_s.tolist()     # one worker thread alone
        self._ssd_depth = self._cpu_k = 1
        self._parallel: dict[int, float] = {}
        self._gil = 0.0
        if self.serial:
            from sim.costs import gil_share

            self._gil = gil_share(self.hw)
            self.cpu_dec_gil = Track(device, "CPU decode")
        self._hdec = c.hit_decode_s.tolist()
        self._mdec = c.cpu_miss_decode_s.tolist()
        self._where = c.decode_where.tolist()
        self._resident = c.resident_bytes.tolist()
        self._linkb = c.link_bytes.tolist()
        self._storedb = c.stored_bytes.tolist()
        # the disk tier: as the runtime's (`DiskRecords`), an LRU of stored records within the
        # host budget, empty at the start; a fetch of a record it lacks reads the disk first
        self._disk_tier = not bool(self.mem.in_host.all())
        self._any_cpu_decode = bool((c.decode_where == CPU).any())
        self._host_lru: "OrderedDict[tuple[int, int], int]" = OrderedDict()
        self._host_held = self._host_peak = 0
        self._layer_pos = {layer: i for i, layer in enumerate(layers)}
        hot = [((layers[li], e), int(c.resident_bytes[li, e])) for li, e in self.wl.hot_order()]
        if self.mem.layer_capacity_bytes is not None:
            caps = {layers[li]: cap for li, cap in enumerate(self.mem.layer_capacity_bytes)}
            self.cache: ExpertCache = PerLayerCache(s.cache_policy, caps, hot)
        else:
            self.cache = make_cache(s.cache_policy, self.mem.cache_capacity_bytes, hot)
        preload = getattr(self.cache, "preload", None)
        self.preloaded = preload() if preload else []
        self.cache_peak = self.cache.used_bytes
        self.inflight: dict[tuple[int, int], _Job] = {}
        self._stage_cache: list[list] = [[None] * self.g.experts_per_layer for _ in range(L)]
        self.staged: dict[int, set] = {li: set() for li in range(L)}
        self.prefetcher = make_prefetcher(s.prefetch)
        self._prefetching = self.prefetcher.name != "none"
        self.rng = random.Random(self.opt.seed)
        self.background_fetch = s.on_miss == "cpu" and s.cache_policy != "static-hot"
        self.stats = dict(bytes_h2d=0, bytes_h2d_prefetch=0, bytes_ssd=0, transfers=0, ssd_reads=0,
                          cpu_runs=0)
        self.hm = {"prefill": [0, 0], "decode": [0, 0]}  # phase -> [hits, misses]
        self.step_marks: list[tuple[str, float, float]] = []

    # -- job plumbing --------------------------------------------------------------------------
    def _advance(self, job: _Job) -> None:
        stages = job.stages
        i = job.i
        n = len(stages)
        while i < n:
            server, dur = stages[i]
            i += 1
            if dur > 0:
                job.i = i
                if self.serial and i >= 2 and stages[i - 2][0].__class__ is Track:
                    # the CPU device decodes a record right after copying it, in one go
                    server.submit(job, dur, URGENT, self._advance)
                elif job.prio:  # a prefetch may be promoted later: remember where it waits
                    job.server = server
                    job.entry = server.submit(job, dur, PREFETCH, self._advance)
                else:
                    server.submit(job, dur, DEMAND, self._advance)
                return
        job.i = i
        job.done(job)

    def _ssd_s(self, li: int, e: int) -> float:
        """One read of expert e from disk while `_ssd_depth` reads are in flight (the reads a
        layer issues at once, up to the depth)."""
        return self.hw.host.disk_record_s(float(self._storedb[li][e]), self._ssd_depth)

    def _fetch_stages(self, li: int, e: int) -> tuple:
        """The stages of fetching expert e of layer position li (the part after the disk read is
        cached: it never changes)."""
        stages = self._stage_cache[li][e]
        where = self._where[li][e]
        if stages is None:
            st = []
            if not (self.serial and where == CPU):
                st.append((self.h2d, self._dev_link_s[li][e]))
            if where == GPU and self._hdec[li][e] == 0:
                st.append((self.gpu_dec, self._gdec[li][e]))
            stages = self._stage_cache[li][e] = tuple(st)
        read = self._host_read(li, e)
        if where == CPU:
            stages = ((self.cpu_dec, self._cpu_dec_s(li, e)),) + stages
            # the share of the decode that holds Python's lock, and the runtime's work (a record
            # read from disk goes from the reader to a worker; its handoff is booked here too)
            held = (self._gil * self._cdec[li][e] + self._host_miss_s
                    + (self._read_s if read else 0.0))
            if held > 0:
                stages += ((self.cpu_dec_gil, held),)
        elif read and self._handoff is not None:
            stages = ((self._handoff, self._read_s),) + stages
        if read:
            return ((self.ssd, self._ssd_s(li, e)),) + stages
        return stages

    def _cpu_dec_s(self, li: int, e: int) -> float:
        """A worker's decode of expert e while `_cpu_k` experts decode at once (the host-codec
        misses a layer issues together, up to the workers), at the measured thread scaling; on
        the CPU device the worker then copies the decoded expert too."""
        if self.serial and self._gil > 0:
            # the worker runs the part of the decode that does not hold Python's lock, in
            # parallel with the other workers (the held part is booked on the model's thread,
            # in turn with everything else it runs: `_fetch_stages`), then copies the expert
            return (1.0 - self._gil) * self._cdec[li][e] + self._link_s[li][e]
        k = self._cpu_k
        p = self._parallel.get(k)
        if p is None:
            from sim.costs import cpu_parallel

            p = self._parallel[k] = cpu_parallel(self.hw, None, k)
        d = self._cdec[li][e] * k / p
        return d + self._link_s[li][e] if self.serial else d

    def _host_read(self, li: int, e: int) -> bool:
        """Whether expert e must be read from disk (and count it); touches the host LRU."""
        if not self._disk_tier:
            return False
        key = (self.g.moe_layers[li], e)
        lru = self._host_lru
        if key in lru:
            lru.move_to_end(key)
            return False
        size = self._storedb[li][e]
        lru[key] = size
        self._host_held += size
        while self._host_held > self.mem.host_budget_bytes and len(lru) > 1:
            self._host_held -= lru.popitem(last=False)[1]
        self._host_peak = max(self._host_peak, self._host_held)
        self.stats["bytes_ssd"] += size
        self.stats["ssd_reads"] += 1
        return True

    def _fetch(self, li: int, e: int, prio: int) -> _Job:
        key = (self.g.moe_layers[li], e)
        stats = self.stats
        nbytes = self._linkb[li][e]
        stats["bytes_h2d"] += nbytes
        stats["transfers"] += 1
        if prio == PREFETCH:
            stats["bytes_h2d_prefetch"] += nbytes
        # on the CPU device the runtime copies a prefetch at once, in line with the demand work
        # of the layer that issued it: it does not yield to later demand traffic
        queue_prio = DEMAND if self.serial else prio
        job = _Job("prefetch" if prio == PREFETCH else "fetch", key, li, e, queue_prio,
                   self._fetch_stages(li, e), self._arrive)
        self.inflight[key] = job
        self._advance(job)
        return job

    def _arrive(self, job: _Job) -> None:
        key = job.key
        del self.inflight[key]
        job.entry = job.server = None  # drop the job <-> queue-entry cycle
        cache = self.cache
        cache.insert(key, self._resident[job.li][job.e])
        if cache.used_bytes > self.cache_peak:
            self.cache_peak = cache.used_bytes
        if key not in cache:
            self.staged[job.li].add(key)
        for w in job.waiters:
            w()

    def _promote(self, job: _Job) -> None:
        if job.prio == PREFETCH:
            job.prio = DEMAND
            server = getattr(job, "server", None)  # unset until the job reaches a server
            if server is not None:
                server.promote(job.entry)

    def _use(self, li: int, e: int, tokens: int, done: Any) -> None:
        """Decode (compressed residency) and compute one resident expert on the GPU; report to
        `done` (a `_Countdown` or `_Sequence`)."""
        key = (self.g.moe_layers[li], e)
        dur = self.times.expert_s(tokens)
        hdec = self._hdec[li][e]
        if self._booked:
            if hdec > 0:
                self._advance(_Job("use", key, li, e, DEMAND, ((self.gpu_dec, hdec),),
                                   lambda _: done.at(self.compute.reserve(key, dur))))
            else:  # the common case: book the compute span, no event
                done.at(self.compute.reserve(key, dur))
        elif hdec > 0:
            stages = ((self.gpu_dec, hdec), (self.compute, dur))
            self._advance(_Job("use", key, li, e, DEMAND, stages, done.one))
        else:
            self.compute.submit(key, dur, DEMAND, done.one)

    def _cpu_run(self, li: int, e: int, tokens: int, then: Callable) -> None:
        stages = []
        read = 0.0
        if self._host_read(li, e):
            stages.append((self.ssd, self._ssd_s(li, e)))
            read = self._read_s
        # decoded and run in the same thread, one after the other
        stages.append((self.cpu, read + self._mdec[li][e] + self.times.cpu_expert_s(tokens)))
        self.stats["cpu_runs"] += 1
        self._advance(_Job("cpu", (self.g.moe_layers[li], e), li, e, DEMAND, stages, then))

    # -- one MoE layer -----------------------------------------------------------------------
    def _expert(self, li: int, e: int, tokens: int, hm: list, done: Any) -> None:
        """Serve one expert of the current layer and report to `done` once it is computed.
        `hm` is the [hits, misses] counter of the current phase."""
        key = (self.g.moe_layers[li], e)
        if self.cache.access(key) or key in self.staged[li]:
            hm[0] += 1
            self._use(li, e, tokens, done)
            return
        hm[1] += 1
        job = self.inflight.get(key)
        if self.serving.on_miss == "cpu":
            self._cpu_run(li, e, tokens, done.one)
            if self.background_fetch and job is None:
                self._fetch(li, e, PREFETCH)
            return
        if job is None:
            job = self._fetch(li, e, DEMAND)
        else:
            self._promote(job)
        job.waiters.append(lambda: self._use(li, e, tokens, done))

    def _layer(self, step_idx: int, li: int, phase: str, then: Callable[[Any], None]) -> None:
        experts, counts = self.wl.steps[step_idx].layers[li]
        hm = self.hm[phase]
        if self._any_cpu_decode:
            layer, cache, where = self.g.moe_layers[li], self.cache, self._where[li]
            n = sum(1 for e in experts if where[e] == CPU and (layer, e) not in cache
                    and (layer, e) not in self.inflight and (layer, e) not in self.staged[li])
            self._cpu_k = max(1, min(self.serving.cpu_workers, n))
        if self._disk_tier:
            layer, host, cache = self.g.moe_layers[li], self._host_lru, self.cache
            reads = sum(1 for e in experts if (layer, e) not in host and (layer, e) not in cache
                        and (layer, e) not in self.inflight and (layer, e) not in self.staged[li])
            self._ssd_depth = max(1, min(self.depth, reads))
        if self.opt.pipeline:
            done = _Countdown(self.env, len(experts), then)
            expert = self._expert
            for e, n in zip(experts, counts):
                expert(li, e, n, hm, done)
        else:
            _Sequence(self.env, list(zip(experts, counts)),
                      lambda e, n, seq: self._expert(li, e, n, hm, seq), then).one()
        if self._prefetching and li + 1 < len(self.g.moe_layers):
            nxt_layer, staged = self.g.moe_layers[li + 1], self.staged[li + 1]
            for e in self.prefetcher.predict(self.wl, step_idx, li + 1, self.rng):
                key = (nxt_layer, e)
                if key not in self.cache and key not in self.inflight and key not in staged:
                    self._fetch(li + 1, e, PREFETCH)

    # The forward pass is a chain of callbacks rather than a simpy process: each finished span
    # starts the next, which saves two events per layer over yielding on them.
    def _start_layer(self) -> None:
        if self._layer_idx == self.g.num_layers:
            self._compute_then(("lm_head", -1), self.times.lm_head_s(self.serving.batch_size),
                               self._end_step)
        else:
            self._compute_then(("attention", self._layer_idx), self._attention_s,
                               self._after_attention)

    def _compute_then(self, item: Any, dur: float, then: Callable[[Any], None]) -> None:
        if self._booked:
            end = self.compute.reserve(item, dur)
            Timeout(self.env, end - self.env.now).callbacks.append(then)
        else:
            self.compute.submit(item, dur, DEMAND, then)

    def _after_attention(self, _: Any) -> None:
        li = self._layer_pos.get(self._layer_idx)
        if li is None:
            self._layer_idx += 1
            self._start_layer()
        else:
            self._layer(self._step_idx, li, self._step.phase, self._after_layer)

    def _after_layer(self, _: Any) -> None:
        self.staged[self._layer_pos[self._layer_idx]].clear()
        self._layer_idx += 1
        self._start_layer()

    def _begin_step(self) -> None:
        self._step = step = self.wl.steps[self._step_idx]
        self._step_start = self.env.now
        # every decoder layer of a step has the same shapes, so one attention time per step
        self._attention_s = self.times.attention_s(step.tokens, self.serving.batch_size,
                                                   step.context, step.phase)
        self._layer_idx = 0
        self._start_layer()

    def _end_step(self, _: Any) -> None:
        self.step_marks.append((self._step.phase, self._step_start, self.env.now))
        self._step_idx += 1
        if self._step_idx < len(self.wl.steps):
            self._begin_step()

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> SimResult:
        self._build()
        self._step_idx = 0
        # The event loop allocates many short-lived objects and no cycles that outlive a step;
        # pausing the cyclic garbage collector saves about a third of the run time.
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            self._begin_step()
            self.env.run()
        finally:
            if gc_enabled:
                gc.enable()
        return self._result()

    def _result(self) -> SimResult:
        end = self.env.now
        marks = self.step_marks
        prefill_end = max((m[2] for m in marks if m[0] == "prefill"), default=0.0)
        decode_marks = [m for m in marks if m[0] == "decode"]
        decode_s = end - prefill_end
        steps = len(decode_marks)
        B = self.serving.batch_size
        tokens = B * steps
        ttft = decode_marks[0][2] if decode_marks else end
        dh, dm = self.hm["decode"]
        ph, pm = self.hm["prefill"]
        mem = self.mem
        gpu_used = mem.non_expert_bytes + mem.kv_bytes + mem.staging_bytes + self.cache_peak
        notes = list(self.wl.notes) + list(mem.notes)
        if self.preloaded:
            notes.append(f"static-hot pinned {len(self.preloaded)} experts before the run "
                         f"(not counted as transfers)")
        labels = [lab for lab in self.times.labels
                  if self.serving.on_miss == "cpu" or not lab.startswith("CPU expert")]
        labels += list(self.costs.labels) + [
            f"H2D link: {self.link.source}, {self.link.gbps:g} GB/s + {self.link.latency_s:g} s "
            f"({'pinned' if self.serving.pinned else 'pageable'})"]
        if not mem.in_host.all():
            h = self.hw.host
            labels.append(
                f"SSD read: {h.disk_curve.source} curve by size and depth, {self.depth} reads in "
                f"flight ({h.disk_curve.method})" if h.disk_curve is not None else
                f"SSD read: {h.disk_read.source}, {h.disk_read.gbps:g} GB/s + "
                f"{h.disk_read.latency_s:g} s per read, one at a time")
        if self.serial:
            labels.append("device: the CPU (copy, decode and compute share the model's thread)")
            if self._gil > 0 and self._any_cpu_decode:
                from sim.costs import gil_share

                tmp: set[str] = set()
                gil_share(self.hw, tmp)
                labels += sorted(tmp)
        return SimResult(
            tokens=tokens, time_s=end, prefill_s=prefill_end, decode_s=decode_s,
            tokens_per_s=tokens / decode_s if decode_s > 0 else float("inf"),
            ttft_s=ttft, tpot_s=decode_s / steps if steps else 0.0,
            bytes_h2d=self.stats["bytes_h2d"], bytes_h2d_prefetch=self.stats["bytes_h2d_prefetch"],
            bytes_ssd=self.stats["bytes_ssd"], transfers=self.stats["transfers"],
            ssd_reads=self.stats["ssd_reads"], cpu_expert_runs=self.stats["cpu_runs"],
            hits=dh, misses=dm, hit_rate=dh / (dh + dm) if dh + dm else 0.0,
            prefill_hit_rate=ph / (ph + pm) if ph + pm else 0.0,
            link_h2d_gbps=self.link.gbps,
            link_busy_fraction=self.h2d.busy_fraction(end),
            decode_busy_fraction=(self.gpu_dec.busy_fraction(end)
                                  if self.gpu_dec is not self.compute
                                  and getattr(self.gpu_dec, "name", "") != "GPU compute" else 0.0),
            cpu_decode_busy_fraction=self.cpu_dec.busy_fraction(end),
            cpu_compute_busy_fraction=self.cpu.busy_fraction(end),
            compute_busy_fraction=self.compute.busy_fraction(end),
            gpu_mem_bytes=int(gpu_used), gpu_budget_bytes=mem.gpu_budget_bytes,
            cache_capacity_bytes=(None if mem.cache_capacity_bytes == float("inf")
                                  else float(mem.cache_capacity_bytes)),
            kv_cache_bytes=mem.kv_bytes,
            host_mem_bytes=self._host_peak if self._disk_tier else mem.host_used_bytes,
            host_budget_bytes=mem.host_budget_bytes,
            disk_busy_fraction=self.ssd.active_fraction(end), disk_depth=self.depth,
            labels=tuple(labels),
            notes=tuple(dict.fromkeys(notes)), config=self.serving.to_dict())
