"""Hardware measurement: the link fit, a quick host profile without a GPU, model timings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from profiles.hardware import load_hardware, save_hardware
from profiles.hardware.fit import fit_link, median_seconds
from profiles.hardware.measure import measure_hardware
from profiles.hardware.timings import model_timings
from profiles.models import resolve_geometry


def test_fit_link_recovers_latency_and_bandwidth():
    sizes = [64 << 10, 1 << 20, 16 << 20, 256 << 20]
    times = [20e-6 + n / 25e9 for n in sizes]          # 20 us + bytes / (25 GB/s)
    fit = fit_link(sizes, times)
    assert fit.latency_s == pytest.approx(20e-6, rel=1e-6)
    assert fit.gbps == pytest.approx(25.0, rel=1e-6)
    assert fit.max_rel_error < 1e-9


def test_fit_link_reports_its_error_and_never_a_negative_latency():
    sizes = [1 << 10, 1 << 20, 1 << 30]
    times = [1e-7, 1.1e-4, 0.09]                       # not a line: the fit must say so
    fit = fit_link(sizes, times)
    assert fit.latency_s >= 0 and fit.gbps > 0
    assert fit.max_rel_error > 0.05
    with pytest.raises(ValueError):
        fit_link([4096, 4096], [1e-3, 2e-3])


def test_median_seconds_runs_warmup_and_repeats():
    calls = []
    med, samples = median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(samples) == 3 and med >= 0


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    disk = tmp_path_factory.mktemp("disk")
    return measure_hardware(None, quick=True, disk_dir=disk, gpu=False, command="pytest")


def test_quick_profile_without_gpu_describes_the_cpu_as_the_device(quick_profile, tmp_path):
    prof = quick_profile
    dev = prof.gpu
    assert dev.device_type == "cpu" and dev.serial
    assert dev.h2d_pinned.source == "measured" and dev.h2d_pinned == dev.h2d_pageable
    assert dev.bf16_gemm_tflops.source == "measured" and dev.bf16_gemm_tflops.value > 0
    # every codec the runtime decodes in place on its device has a measured speed there
    assert {"szp", "ans", "gq", "rtn8"} <= set(dev.decode)
    assert all(c.source == "measured" and min(c.gbps) > 0 for c in dev.decode.values())
    assert "sz3" not in dev.decode                     # sz3 decodes on the host workers
    h = prof.host
    for fig in (h.cores, h.memory_bytes, h.memcpy_gbps):
        assert fig.source == "measured" and fig.value > 0
    assert h.disk_read.source == "measured" and h.disk_read.gbps > 0
    assert h.disk_read.fit_rel_error is not None
    assert set(h.codecs) == {"sz3", "lossless"}
    sz3 = h.codecs["sz3"]
    assert sz3.decode.levels == (0.1, 0.3, 1.0, 2.0, 3.0) and sz3.decode.mode == "meanabs"
    assert all(g > 0 for g in sz3.decode.gbps + sz3.encode.gbps)
    assert sz3.threads.source == "measured" and sz3.threads.threads == (1, 2)
    assert sz3.threads.speedup[0] == 1.0 and sz3.parallel(2) <= 2.0
    curve = h.disk_curve
    assert curve.source == "measured" and curve.depths == (1, 4)
    assert curve.sizes == (4096, 65536, 1 << 20) and curve.best_depth in curve.depths
    assert all(v > 0 for row in curve.gbps for v in row)
    assert curve.method in ("O_DIRECT", "posix_fadvise(DONTNEED) before each read")
    ffn = h.cpu_expert_ffn
    assert ffn.curve.source == "measured" and len(ffn.curve.tokens) == len(ffn.curve.seconds)
    # raw samples behind the fits, and the command
    assert prof.raw["command"] == "pytest"
    assert len(prof.raw["host.disk_read"]["bytes"]) == len(prof.raw["host.disk_read"]["seconds"])
    out = tmp_path / "hw.json"
    save_hardware(prof, out)
    doc = json.loads(out.read_text())
    assert doc["gpu"]["device_type"] == "cpu" and doc["kind"] == "hardware_profile"
    assert doc["schema_version"] == 1
    again = load_hardware(out)
    assert again.host.disk_read == prof.host.disk_read and again.gpu == prof.gpu
    assert again.host.disk_curve == curve and again.host.codecs["sz3"].threads == sz3.threads


def test_model_timings_measured_for_a_small_model_estimated_for_a_big_one(quick_profile):
    raw: dict = {}
    small = resolve_geometry("arch:qwen3_moe,hidden_size=64,moe_intermediate_size=32,"
                             "num_hidden_layers=2,num_experts=4,num_experts_per_tok=2,num_attention_heads=4,"
                             "num_key_value_heads=2,head_dim=16,vocab_size=50")
    mt = model_timings(small, quick_profile.host, None, raw, quick=True)
    assert mt.expert_ffn.source == "measured" and mt.attention_router.source == "measured"
    assert mt.matches(small)
    assert all(s > 0 for s in mt.expert_ffn.seconds)
    assert f"model_timings.{small.name}" in raw

    big = resolve_geometry("preset:deepseek-v3")
    mt = model_timings(big, quick_profile.host, None, raw, quick=True)
    assert mt.expert_ffn.source == "estimated" and mt.attention_router.source == "estimated"
    assert "roofline" in mt.expert_ffn.note
    # the estimate grows with tokens once compute-bound, and never below the weight-read time
    rate = 2 * quick_profile.host.cpu_expert_ffn.params * quick_profile.host.cpu_expert_ffn.curve.tokens[-1] \
        / quick_profile.host.cpu_expert_ffn.curve.seconds[-1]
    params = 3 * big.hidden_size * big.expert_intermediate_size
    assert mt.expert_ffn.seconds[-1] == pytest.approx(
        max(2 * params * mt.expert_ffn.tokens[-1] / rate,
            params * 2 / (quick_profile.host.memcpy_gbps.value * 1e9)))
    assert mt.attention_router.seconds[-1][-1] >= mt.attention_router.seconds[0][0]


def test_bad_disk_dir_is_a_clear_error(tmp_path):
    from profiles.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        measure_hardware(None, quick=True, disk_dir=tmp_path / "nope", gpu=False)


@pytest.mark.gpu
def test_gpu_section_is_measured_with_fits():
    prof = measure_hardware(None, quick=True, gpu=True)
    g = prof.gpu
    assert g is not None and g.memory_bytes.value > 0
    for lf in (g.h2d_pinned, g.h2d_pageable, g.d2h_pinned, g.d2h_pageable):
        assert lf.source == "measured" and lf.gbps > 0 and lf.fit_rel_error is not None
    assert g.bf16_gemm_tflops.value > 0 and g.d2d_gbps.value > 0
    assert "szp" in g.decode and not math.isnan(g.decode["szp"].gbps[0])
    assert torch.cuda.is_available()


def test_disk_curve_measures_a_record_size_that_is_not_a_multiple_of_a_page(tmp_path):
    """A packed expert record is rarely a whole number of 4 KiB pages (gpt-oss experts carry
    biases): with O_DIRECT the read must still succeed, as the runtime's disk tier reads the
    page-aligned span around a record."""
    import mmap
    import os

    from profiles.hardware.disk import disk_read

    probe = tmp_path / "probe"
    probe.write_bytes(b"\0" * 8192)
    try:
        fd = os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT reads")
    finally:
        os.close(fd)
    raw: dict = {}
    link, curve = disk_read(tmp_path, 1 << 20, (4096,), raw, depths=(1, 2), record_bytes=5000)
    assert curve.sizes == (4096, 5000) and curve.method == "O_DIRECT"
    assert all(g > 0 for row in curve.gbps for g in row)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_reader_closes_the_o_direct_file_when_o_direct_reads_are_refused(tmp_path,
                                                                              monkeypatch):
    """A filesystem may open a file with O_DIRECT and then refuse the read: the reader falls
    back to page-cache reads, without leaving the O_DIRECT descriptor open."""
    import os

    from profiles.hardware import disk

    path = tmp_path / "scratch"
    path.write_bytes(b"\1" * (1 << 16))
    real = os.preadv
    calls = []

    def refuse_first(fd, bufs, offset):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(22, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(disk.os, "preadv", refuse_first)
    before = len(os.listdir("/proc/self/fd"))
    method, read = disk._direct_reader(str(path))
    assert method.startswith("posix_fadvise")
    assert read(0, 4096) > 0
    read(0, 0)     # close
    assert len(os.listdir("/proc/self/fd")) == before


def test_disk_reader_without_o_direct_does_not_claim_it(tmp_path, monkeypatch):
    import os

    from profiles.hardware import disk

    path = tmp_path / "scratch"
    path.write_bytes(b"\1" * (1 << 16))
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    method, read = disk._direct_reader(str(path))
    try:
        assert method != "O_DIRECT"
    finally:
        read(0, 0)
