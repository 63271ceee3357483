"""The offloaded runtime on the CPU (the CPU is the device): same tokens as the in-memory model
with the policy applied, misses under a small budget, bytes moved = the missed experts' packed
sizes, resident bytes within the budget; GPU tests run only with CUDA.

Tolerance: greedy tokens must be identical and every step's logits within 2e-2 (absolute) of the
in-memory model with the same policy applied. The runtime computes each expert separately
(transformers' grouped matrix product over all experts is not bit-identical to per-expert
products); on the CPU the two agree to a bf16 ulp or exactly.
"""

from __future__ import annotations

import pytest
import torch

from profiles.errors import ConfigError, PolicyError
from profiles.models import load_model
from profiles.packed import pack
from profiles.policy import Policy, apply_policy
from profiles.runtime import greedy_generate, measure_throughput, synthetic_prompt
from profiles.runtime.memory import device_budget
from profiles.serving import ServingConfig
from tests.fixtures_models import save_tiny_model

SZP = Policy.uniform("szp", "meanabs", 0.5)
LOGIT_ATOL = 2e-2
STEPS, PROMPT = 6, 5


_MODELS: dict[str, object] = {}


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    def get(arch: str = "mixtral"):
        if arch not in _MODELS:
            _MODELS[arch] = load_model(str(save_tiny_model(arch, tmp_path_factory.mktemp(arch))))
        return _MODELS[arch]
    return get


def serving(**kw) -> ServingConfig:
    base = dict(gpu_mem_fraction=0.5, prompt_tokens=PROMPT, generated_tokens=STEPS)
    base.update(kw)
    return ServingConfig(**base)


def prompt(loaded):
    return synthetic_prompt(1, PROMPT, loaded.geometry.vocab_size, seed=1)


def reference(loaded, policy, ids):
    with apply_policy(loaded, policy):
        return greedy_generate(loaded.model, ids, STEPS, record_logits=True)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_same_tokens_as_the_in_memory_model_with_the_policy(tiny_loaded, arch):
    lm = tiny_loaded(arch)
    ids = prompt(lm)
    ref = reference(lm, SZP, ids)
    got = measure_throughput(lm, SZP, serving(prefetch="next:1"), prompt_ids=ids,
                             record_logits=True, device="cpu")
    assert got.output_ids == ref.ids.tolist()
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(b, a, atol=LOGIT_ATOL, rtol=0)
    assert got.misses > 0                      # a 50 % budget cannot hold every expert
    # the model's own experts modules are back afterwards
    for layer in lm.geometry.moe_layers:
        block = lm.model.get_submodule(lm.expert_map.block_names[layer])
        assert block.experts is lm.expert_map.expert_modules[layer]


def test_misses_move_exactly_the_missed_experts_packed_bytes(tiny_loaded):
    lm = tiny_loaded()
    r = measure_throughput(lm, SZP, serving(gpu_mem_fraction=0.3), prompt_ids=prompt(lm),
                           device="cpu")
    assert r.misses > 0 and r.hit_rate < 1.0
    demand = [f for f in r.fetches if f[1] == "fetch"]
    assert len(demand) == len(r.fetches)        # no prefetch configured
    # one transfer per miss (prefill and decode), each of the expert's whole packed record
    assert len(demand) == r.misses + r.prefill_misses
    assert r.bytes_h2d == sum(r.expert_sizes[key][0] for key, _, _ in demand)
    assert r.bytes_h2d == sum(n for _, _, n in demand)
    # ...which is what the codec layer says those experts compress to (plus alignment padding)
    for key, _, n in demand[:5]:
        ref = lm.expert_map.get(*key)
        blobs = sum(_blob_nbytes(t) for t in ref.tensors.values())
        assert blobs <= n < blobs + 16 * len(ref.tensors)


def _blob_nbytes(t) -> int:
    from profiles.codecs import compressed_nbytes

    return compressed_nbytes(t, "szp", "meanabs", 0.5)


@pytest.mark.parametrize("cache,resident", [("lru", "decompressed"), ("lfu", "compressed"),
                                            ("static-hot", "decompressed")])
def test_resident_bytes_never_exceed_the_budget(tiny_loaded, cache, resident):
    lm = tiny_loaded()
    r = measure_throughput(lm, SZP, serving(gpu_mem_fraction=0.4, cache_policy=cache,
                                            resident_form=resident),
                           prompt_ids=prompt(lm), device="cpu")
    assert r.cache_capacity_bytes is not None and r.cache_capacity_bytes > 0
    assert 0 < r.resident_peak_bytes <= r.cache_capacity_bytes
    assert r.cache_peak_bytes <= r.cache_capacity_bytes
    if cache == "static-hot":
        assert r.preload_bytes > 0 and r.bytes_h2d_prefetch == 0


def test_unlimited_memory_fetches_each_expert_once(tiny_loaded):
    lm = tiny_loaded()
    r = measure_throughput(lm, SZP, serving(gpu_mem_fraction=None), prompt_ids=prompt(lm),
                           device="cpu")
    keys = [f[0] for f in r.fetches]
    assert len(keys) == len(set(keys))
    assert r.cache_capacity_bytes is None


def test_host_codec_and_cpu_execution_of_misses(tiny_loaded):
    lm = tiny_loaded()
    pol = Policy.uniform("sz3", "meanabs", 0.5)
    ids = prompt(lm)
    ref = reference(lm, pol, ids)
    r = measure_throughput(lm, pol, serving(gpu_mem_fraction=0.3), prompt_ids=ids, device="cpu")
    assert r.output_ids == ref.ids.tolist()
    # host codecs decode on the CPU and send the decoded (original) bytes
    assert all(n == lm.geometry.bytes_per_expert for _, _, n in r.fetches)
    assert any(s[0] == "CPU decode" for s in r.spans)
    cpu = measure_throughput(lm, pol, serving(gpu_mem_fraction=0.3, on_miss="cpu"),
                             prompt_ids=ids, device="cpu")
    assert cpu.output_ids == ref.ids.tolist()
    assert cpu.cpu_expert_runs > 0
    assert all(kind == "prefetch" for _, kind, _ in cpu.fetches)   # background copies only


def test_packed_directory_serves_the_same_tokens(tiny_loaded, tmp_path):
    lm = tiny_loaded()
    ids = prompt(lm)
    ckpt = pack(lm, SZP, tmp_path / "ckpt")
    a = measure_throughput(ckpt.path, None, serving(), prompt_ids=ids, device="cpu")
    b = measure_throughput(lm, SZP, serving(), prompt_ids=ids, device="cpu")
    assert a.output_ids == b.output_ids
    assert a.host_expert_bytes == ckpt.stored_expert_bytes
    with pytest.raises(PolicyError, match="was packed with"):
        measure_throughput(ckpt.path, Policy.none(), serving(), prompt_ids=ids, device="cpu")


def test_packed_directory_below_the_host_budget_reads_experts_from_disk(tiny_loaded, tmp_path):
    """The disk tier: records beyond --host-mem stay in the layer files and are read on demand;
    the tokens and logits are those of the all-in-memory packed run, the host never holds more
    than the budget, and what was read is counted."""
    lm = tiny_loaded()
    ids = prompt(lm)
    ckpt = pack(lm, SZP, tmp_path / "ckpt")
    budget = ckpt.stored_expert_bytes // 4
    ram = measure_throughput(ckpt.path, None, serving(), prompt_ids=ids, device="cpu",
                             record_logits=True)
    disk = measure_throughput(ckpt.path, None, serving(host_mem_bytes=budget), prompt_ids=ids,
                              device="cpu", record_logits=True)
    assert disk.output_ids == ram.output_ids
    assert all(torch.equal(a, b) for a, b in zip(disk.logits, ram.logits))
    note = next(n for n in disk.notes if n.startswith("disk tier"))
    reads, held = int(note.split()[2]), int(note.split("at most ")[1].split()[0])
    assert reads > 0 and held <= budget
    assert disk.host_expert_bytes == held     # shown as measured: what was held, not the budget
    assert disk.expert_sizes == ram.expert_sizes


def test_bad_budgets_are_refused(tiny_loaded):
    lm = tiny_loaded()
    with pytest.raises(ConfigError, match="raise --gpu-mem"):
        measure_throughput(lm, SZP, serving(gpu_mem_fraction=None, gpu_mem_bytes=1000),
                           device="cpu")
    with pytest.raises(ConfigError, match="encoded in memory; pack the model"):
        measure_throughput(lm, SZP, serving(host_mem_bytes=10), device="cpu")
    with pytest.raises(PolicyError, match="fingerprint"):
        measure_throughput(lm, SZP.with_fingerprint("fp2:0000000000000000"), serving(),
                           device="cpu")


def test_cache_capacity_is_the_simulators(tiny_loaded):
    from sim.costs import uniform_costs
    from sim.memory import memory_layout

    g = tiny_loaded().geometry
    for sv in (serving(), serving(gpu_mem_fraction=0.8, batch_size=3, staging_slots=1),
               serving(gpu_mem_fraction=None, gpu_mem_bytes=200_000)):
        sizes = {(layer, e): g.bytes_per_expert for layer in g.moe_layers
                 for e in range(g.experts_per_layer)}
        ours = device_budget(g, sv, sizes)
        costs = uniform_costs(g.moe_layers, g.experts_per_layer, original_bytes=g.bytes_per_expert)
        theirs = memory_layout(g, sv, costs, [])
        assert ours.cache_capacity_bytes == theirs.cache_capacity_bytes
        assert ours.kv_bytes == theirs.kv_bytes


def test_timeline_uses_the_simulators_tracks(tiny_loaded):
    lm = tiny_loaded()
    r = measure_throughput(lm, Policy.uniform("szp", "meanabs", 0.5), serving(gpu_mem_fraction=0.3),
                           prompt_ids=prompt(lm), device="cpu")
    tracks = {s[0] for s in r.spans}
    assert {"steps", "GPU compute", "GPU decode", "H2D link"} <= tracks
    assert sum(1 for s in r.spans if s[0] == "steps") == STEPS + 1
    assert all(s[3] >= s[2] for s in r.spans)
    frame = r.routing_frame()
    assert len(frame) == (PROMPT + STEPS) * len(lm.geometry.moe_layers) * lm.geometry.top_k


@pytest.mark.gpu
def test_gpu_runtime_matches_the_in_memory_model(tiny_loaded):
    lm = tiny_loaded()
    ids = prompt(lm).cuda()
    lm.model.to("cuda")
    try:
        ref = reference(lm, SZP, ids)          # the policy applied on the GPU, same kernels
        r = measure_throughput(lm, SZP, serving(prefetch="next:1"), prompt_ids=ids,
                               record_logits=True, device="cuda")
    finally:
        lm.model.to("cpu")
    assert r.output_ids == ref.ids.tolist()
    for a, b in zip(ref.logits, r.logits):
        torch.testing.assert_close(b, a, atol=LOGIT_ATOL, rtol=0)
    assert r.misses > 0 and r.bytes_h2d > 0
    assert r.device_peak_bytes is not None and r.link_achieved_gbps is not None
    assert {"H2D link", "GPU decode", "GPU compute"} <= {s[0] for s in r.spans}


@pytest.mark.parametrize("codec", ["rtn8", "rtn4", "gq", "nf4", "mxfp4", "q4_k"])
def test_rtn_experts_cross_the_link_compressed_and_decode_on_the_device(tiny_loaded, codec):
    # the planner and simulator cost rtn as GPU-decoded; the runtime must move its packed bytes,
    # not the decoded bf16 ones, and produce what the in-memory policy produces
    lm = tiny_loaded()
    policy = Policy.uniform(codec)
    ids = prompt(lm)
    ref = reference(lm, policy, ids)
    r = measure_throughput(lm, policy, serving(gpu_mem_fraction=0.3), prompt_ids=ids,
                           record_logits=True, device="cpu")
    assert r.output_ids == ref.ids.tolist()
    demand = [f for f in r.fetches if f[1] == "fetch"]
    assert demand and r.bytes_h2d == sum(n for _, _, n in demand)
    from profiles.codecs import compressed_nbytes

    for key, _, n in demand[:5]:
        blobs = sum(compressed_nbytes(t, codec) for t in lm.expert_map.get(*key).tensors.values())
        assert blobs <= n < blobs + 16 * 2 < lm.geometry.bytes_per_expert


def test_unknown_device_is_a_config_error():
    from profiles.runtime.runner import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="--device 'tpu' is not supported; choose cuda or cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_ans_experts_decode_in_place_like_the_in_memory_policy(tiny_loaded):
    # ans payloads are decoded from the runtime's own copy (profiles.runtime.device_decode), with
    # their outlier patches, exactly as the in-memory policy's real round trip decodes them
    lm = tiny_loaded()
    policy = Policy.uniform("ans", "meanabs", 0.5)
    ids = prompt(lm)
    ref = reference(lm, policy, ids)
    r = measure_throughput(lm, policy, serving(gpu_mem_fraction=0.3), prompt_ids=ids,
                           record_logits=True, device="cpu")
    assert r.output_ids == ref.ids.tolist() and r.misses > 0
    for a, b in zip(ref.logits, r.logits):
        torch.testing.assert_close(b, a, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc")
def test_the_disk_tier_closes_its_layer_files(tiny_loaded, tmp_path):
    import gc
    import os

    from profiles.runtime.store import ExpertStore

    ckpt = pack(tiny_loaded(), SZP, tmp_path / "ckpt")
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        store = ExpertStore.from_packed(ckpt, host_budget_bytes=1000)
        assert store.on_disk
        store.records[(0, 0)], store.records[(2, 1)]
        del store
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    store = ExpertStore.from_packed(ckpt, host_budget_bytes=1000)
    store.records[(1, 0)]
    store.records.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_disk_tier_plans_with_the_records_own_decode_place(tiny_loaded, tmp_path):
    """gpt_oss's zero expert biases are stored as lossless fallbacks inside szp records: those
    records decode on the host and cross the link decoded. The disk tier, which plans before
    reading any record, must say so as the all-in-memory store does (else device bytes are
    planned at the compressed size)."""
    from profiles.runtime.store import ExpertStore

    ckpt = pack(tiny_loaded("gpt_oss"), SZP, tmp_path / "ckpt")
    ram = ExpertStore.from_packed(ckpt)
    disk = ExpertStore.from_packed(ckpt, host_budget_bytes=1000)
    assert disk.on_disk and not any(r.device_decodable for r in ram.infos().values())
    assert disk.infos() == ram.infos()
    assert disk.records.reads == 0          # planned without reading a record


def test_runtime_calibration_of_the_cpu_device(tiny_loaded):
    """The CPU device calibrated on the model's own runs: decode speeds re-timed on a real
    expert, attention per batch from all-hit runs, the copy fit from the cold runs' copies, and
    per batch the all-hit FFN curve and the runtime's per-miss work, and the extra work of a
    host-codec miss from cold runs of `sz3` experts; all labelled measured and saved."""
    import copy

    from profiles.hardware import profile_from_dict
    from profiles.runtime.calibrate import runtime_calibration
    from tests.sim.conftest import HW_DOC

    doc = copy.deepcopy(HW_DOC)
    doc["gpu"]["device_type"] = "cpu"
    doc["model_timings"] = []
    base = profile_from_dict(doc, "base")
    lm = tiny_loaded()
    prof, raw = runtime_calibration(lm, base, tokens=4, prompt=4, batches=(1, 2))
    dev = prof.gpu
    assert dev.serial and dev.h2d_pinned == dev.h2d_pageable == dev.d2h_pinned
    assert dev.h2d_pinned.source == "measured" and "copies" in dev.h2d_pinned.note
    assert raw["batch 1"]["per_miss_overhead_s"] >= 0 and raw["batch 2"]["per_miss_overhead_s"] >= 0
    assert raw["host_miss_overhead_s"]["policy"].startswith("sz3")
    assert raw["decode_miss_overhead_s"]["policy"].startswith("szp")
    assert raw["disk_read_overhead_s"]["reads"] > 0
    assert dev.decode["szp"].source == "measured" and "experts of" in dev.decode["szp"].note
    assert prof.host.codecs["sz3"].decode.source == "measured"
    mt = prof.timings_for(lm.geometry)
    assert mt is not None and mt.expert_ffn.source == "measured"
    assert set(mt.attention_router.batch) >= {1, 2}        # a row per calibrated batch
    assert mt.attention_router.source == "measured" and min(min(r) for r in
                                                            mt.attention_router.seconds) > 0
    assert [b.batch for b in mt.by_batch] == [1, 2]
    assert all(b.expert_ffn.source == "measured" and b.miss_overhead_s >= 0 for b in mt.by_batch)
    for field in ("host_miss_overhead_s", "decode_miss_overhead_s", "disk_read_overhead_s"):
        assert getattr(mt, field) is not None and getattr(mt, field) >= 0
        assert raw[field]["seconds"] == getattr(mt, field)
    again = profile_from_dict(prof.to_dict(), "again")       # the new figures survive a save
    assert again.timings_for(lm.geometry).by_batch == mt.by_batch
    assert again.timings_for(lm.geometry) == mt


def test_an_overhead_is_fitted_until_the_simulator_predicts_its_run(tiny_loaded, tmp_path):
    """`fitted_overhead` on a cold run served from disk: the per-read work it finds makes the
    prediction of that run its measured time (or is 0 where the simulator already predicts it
    slower), and it is never negative."""
    import copy
    import dataclasses

    from profiles.hardware import profile_from_dict
    from profiles.runtime.calibrate import calibrated_on_runs, fitted_overhead
    from sim.replay import predict_for_run
    from tests.sim.conftest import HW_DOC

    doc = copy.deepcopy(HW_DOC)
    doc["gpu"]["device_type"] = "cpu"
    doc["model_timings"] = []
    lm = tiny_loaded()
    sv = ServingConfig(prompt_tokens=4, generated_tokens=6)
    warm = measure_throughput(lm, None, sv, device="cpu", warm_cache=True)
    cold = measure_throughput(lm, None, dataclasses.replace(sv, gpu_mem_fraction=0.25),
                              device="cpu")
    prof = calibrated_on_runs(profile_from_dict(doc, "base"), [(1, warm, cold)], "test")
    ckpt = pack(lm, Policy.none(lm.fingerprint), tmp_path / "raw")
    run = measure_throughput(ckpt.path, None, dataclasses.replace(
        sv, gpu_mem_fraction=0.25, host_mem_fraction=0.1), device="cpu")
    assert run.disk_reads > 0
    fitted = fitted_overhead(prof, run, "disk_read_overhead_s")
    x = fitted.timings_for(lm.geometry).disk_read_overhead_s
    p = predict_for_run(run, fitted).result
    assert x >= 0
    assert p.time_s == pytest.approx(run.time_s, rel=0.02) or (x == 0 and p.time_s > run.time_s)


def test_the_disk_tier_counts_a_read_when_it_is_requested(tiny_loaded, tmp_path):
    """As the simulator does: a read is counted when it is issued, so a read still in flight when
    the run ends (a prefetch, a background copy) is in the run's figures, whatever the timing of
    the pool thread."""
    import threading

    from profiles.runtime.store import ExpertStore

    ckpt = pack(tiny_loaded(), SZP, tmp_path / "ckpt")
    store = ExpertStore.from_packed(ckpt, host_budget_bytes=1000, disk_depth=2)
    d = store.records
    gate = threading.Event()
    read = d.files.read

    def slow(entry, pin=False):
        gate.wait(10)
        return read(entry, pin)

    d.files.read = slow
    try:
        pending = d.request((0, 0))
        assert (d.reads, d.read_bytes) == (1, d.entries[(0, 0)].size)
        d.request((0, 0))                      # the same read, still in flight: not a second
        assert d.reads == 1
    finally:
        gate.set()
    pending.result()
    assert (d.reads, d.read_bytes) == (1, d.entries[(0, 0)].size)
    d.close()


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_run_from_disk_leaves_no_read_threads_or_open_layer_files(tiny_loaded, tmp_path):
    """measure_throughput opens the disk tier of a packed directory itself: it stops the read
    pool and closes the layer files when the run ends (not whenever the garbage collector
    gets to the runtime's reference cycles)."""
    import gc
    import os
    import threading

    ckpt = pack(tiny_loaded(), SZP, tmp_path / "ckpt")
    sv = serving(host_mem_bytes=ckpt.stored_expert_bytes // 4)
    measure_throughput(ckpt.path, None, sv, device="cpu")   # first-use allocations
    gc.collect()

    def disk_threads():
        return {t for t in threading.enumerate() if t.name.startswith("moesz-disk")}

    threads, fds = disk_threads(), len(os.listdir("/proc/self/fd"))
    gc.disable()
    try:
        r = measure_throughput(ckpt.path, None, sv, device="cpu")
        assert r.disk_reads > 0
        assert disk_threads() <= threads
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        gc.enable()


def test_a_host_codec_record_read_from_disk_is_decoded_as_soon_as_its_read_lands(tiny_loaded,
                                                                                  tmp_path):
    """A layer's host-codec misses on the disk tier decode on the worker threads together, as
    the simulator has them: each decode starts when its read finishes, not when the model's
    thread gets to that expert (which decoded a layer's misses one after another)."""
    import threading

    from profiles.runtime.store import ExpertStore
    from profiles.runtime.timeline import Timeline
    from profiles.runtime.transfers import Transfers

    ckpt = pack(tiny_loaded(), Policy.uniform("lossless"), tmp_path / "ckpt")
    store = ExpertStore.from_packed(ckpt, host_budget_bytes=1000, disk_depth=2)
    cpu = torch.device("cpu")
    tr = Transfers(cpu, Timeline(cpu), cpu_workers=2)
    started = threading.Event()
    decode = tr._host_decode_and_send

    def spy(record, kind):
        started.set()
        return decode(record, kind)

    tr._host_decode_and_send = spy
    try:
        job = tr.fetch_after_read((0, 0), store.records.request((0, 0)), "fetch")
        assert started.wait(10), "the decode waited for the model's thread"
        tr.complete(job, False)
        job.wait()
        ref = ExpertStore.from_packed(ckpt)[(0, 0)]
        want = tr.host_weights(ref, None)
        assert all(torch.equal(job.weights[n], want[n]) for n in want)
    finally:
        tr.close()
        store.records.close()


def test_direct_reads_without_o_direct_say_what_they_do(tiny_loaded, tmp_path, monkeypatch):
    """Where the platform has no O_DIRECT (macOS), a `direct` reader falls back to dropping each
    record's pages after reading it, and says so, rather than reading through the page cache
    while the run's note claims O_DIRECT."""
    import os

    from profiles.packed.read import RecordFiles

    ckpt = pack(tiny_loaded(), SZP, tmp_path / "ckpt")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    files = RecordFiles(ckpt, "direct")
    try:
        entry = ckpt.experts[0]
        assert files.read(entry).numel() == entry.size
        assert files.method != "direct"
    finally:
        files.close()


def test_direct_reads_without_o_direct_nor_fadvise_say_they_are_cached(tiny_loaded, tmp_path,
                                                                        monkeypatch):
    import os

    from profiles.packed.read import RecordFiles

    ckpt = pack(tiny_loaded(), SZP, tmp_path / "ckpt")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    files = RecordFiles(ckpt, "direct")
    try:
        files.read(ckpt.experts[0])
        assert files.method == "cached"
    finally:
        files.close()


@pytest.mark.parametrize("method", ["direct", "fadvise"])
def test_a_failing_drive_is_one_line_and_only_a_refused_o_direct_falls_back(tiny_loaded, tmp_path,
                                                                          monkeypatch, method):
    """EINVAL from an O_DIRECT read is the filesystem refusing it: fall back and read. Any other
    error (EIO: the drive) is reported in one line naming the file and the expert, never taken
    for a refusal that silently changes what the run measures."""
    import errno
    import os

    from profiles.packed.read import RecordFiles
    from profiles.packed.records import PackedError

    ckpt = pack(tiny_loaded(), SZP, tmp_path / "ckpt")
    entry = ckpt.experts[0]
    real = os.preadv
    failing = {"errno": errno.EINVAL}

    def preadv(fd, bufs, offset):
        if failing["errno"] is not None:
            err = failing["errno"]
            failing["errno"] = None if err == errno.EINVAL else err
            raise OSError(err, os.strerror(err))
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    files = RecordFiles(ckpt, method)
    try:
        if method == "direct":
            assert files.read(entry).numel() == entry.size      # EINVAL: refused, fell back
            assert files.method != "direct"
        failing["errno"] = errno.EIO
        with pytest.raises(PackedError, match=r"reading layer \d+ expert \d+ failed "
                                              r"\(Input/output error\); check the drive"):
            files.read(entry)
    finally:
        files.close()


def test_a_measured_run_pickles_and_predicts_the_same_afterwards(tiny_loaded):
    """A `RunResult` survives pickling (its expert spans keep their token counts), so a run can
    be stored and predicted again with another hardware profile later."""
    import pickle

    from profiles.runtime.timeline import Computed

    r = measure_throughput(tiny_loaded(), None, ServingConfig(prompt_tokens=4, generated_tokens=3,
                                                              gpu_mem_fraction=0.25),
                           device="cpu")
    back = pickle.loads(pickle.dumps(r))
    spans = [(s[1], s[1].tokens) for s in r.spans if isinstance(s[1], Computed)]
    again = [(s[1], s[1].tokens) for s in back.spans if isinstance(s[1], Computed)]
    assert spans and again == spans and back.tokens_per_s == r.tokens_per_s
