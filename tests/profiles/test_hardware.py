"""Hardware profile schema: the shipped preset, round trips, curves and clear errors."""

from __future__ import annotations

import copy
import json

import pytest

from profiles.errors import ProfileError
from profiles.hardware import (SOURCES, LevelCurve, TokenCurve, list_presets, load_hardware,
                               profile_from_dict, save_hardware)
from profiles.hardware.schema import AttentionTimings


def _figures(node, path=""):
    """Every dict under `node` that carries a 'source' (a labelled figure, fit or curve)."""
    if isinstance(node, dict):
        if isinstance(node.get("source"), str):
            yield path, node
        for k, v in node.items():
            yield from _figures(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _figures(v, f"{path}[{i}]")


def test_h200_published_preset():
    assert "h200-published" in list_presets()
    hw = load_hardware("preset:h200-published")
    assert hw.origin == "preset:h200-published" and hw.source.kind == "preset"
    gpu = hw.gpu
    assert gpu.h2d_pinned.gbps == 50.0 and gpu.h2d_pageable.gbps == pytest.approx(40.0)
    assert gpu.bf16_gemm_tflops.value == 790.0 and gpu.d2d_gbps.value == 4300.0
    assert gpu.decode["szp"].source == "published" and "A100" in gpu.decode["szp"].note
    assert gpu.h2d_pinned.time_s(50e9) == pytest.approx(1.0 + gpu.h2d_pinned.latency_s)
    assert hw.host.codecs["sz3"].decode.gbps[0] > 0 and hw.host.disk_read.gbps > 0
    figures = list(_figures(hw.to_dict()))
    assert len(figures) >= 15
    for path, fig in figures:
        assert fig["source"] in SOURCES, path
        if fig["source"] == "published":
            assert fig.get("note"), f"{path}: a published figure must name its source"


def test_round_trip(tmp_path):
    hw = load_hardware("preset:h200-published")
    save_hardware(hw, tmp_path / "hw.json")
    again = load_hardware(tmp_path / "hw.json")
    assert again.to_dict() == hw.to_dict() and again.origin == str(tmp_path / "hw.json")


def _doc():
    return json.loads(json.dumps(load_hardware("preset:h200-published").to_dict()))


def _write(tmp_path, doc):
    p = tmp_path / "hw.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(schema_version=2), r"'schema_version' is 2, expected 1"),
    (lambda d: d.update(kind="model_profile"), r"'kind' is 'model_profile', expected 'hardware_profile'"),
    (lambda d: d["gpu"]["h2d_pinned"].update(gbps=0), r"field 'gpu\.h2d_pinned\.gbps' must be > 0"),
    (lambda d: d["host"]["disk_read"].update(latency_s=-1), r"'host\.disk_read\.latency_s' must be >= 0"),
    (lambda d: d["gpu"]["bf16_gemm_tflops"].update(source="guessed"),
     r"'gpu\.bf16_gemm_tflops\.source' is 'guessed'; expected one of measured, published"),
    (lambda d: d["gpu"]["decode"]["szp"].update(gbps=[1.0, 2.0]), r"'gpu\.decode\.szp\.gbps' has 2 values"),
    (lambda d: d["host"].pop("memcpy_gbps"), r"'host\.memcpy_gbps' is missing"),
    (lambda d: d["gpu"]["decode"]["szp"].update(levels=[2.0], gbps=[1.0]) or
     d["gpu"]["decode"]["szp"].update(levels=[2.0, 1.0], gbps=[1.0, 1.0]),
     r"'gpu\.decode\.szp\.levels' must be strictly increasing"),
])
def test_errors_name_file_field_and_expectation(tmp_path, edit, match):
    doc = _doc()
    edit(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(ProfileError, match=match) as info:
        load_hardware(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="shipped presets: preset:h200-published"):
        load_hardware("preset:h100-imaginary")
    with pytest.raises(ProfileError, match="no such file"):
        load_hardware(tmp_path / "nope.json")


def test_no_gpu_section_is_valid():
    doc = _doc()
    doc.pop("gpu")
    hw = profile_from_dict(doc, "cpu-only")
    assert hw.gpu is None


def test_model_timings_parse_and_match():
    doc = _doc()
    doc["model_timings"] = {
        "model": "preset:olmoe-1b-7b", "hidden_size": 2048, "expert_intermediate_size": 1024,
        "expert_ffn": {"tokens": [1, 8], "seconds": [1e-5, 2e-5], "source": "estimated"},
        "attention_router": {"batch": [1, 4], "context_tokens": [128, 1024],
                             "seconds": [[1e-4, 2e-4], [3e-4, 4e-4]], "source": "estimated"}}
    hw = profile_from_dict(doc, "x")
    mt = hw.model_timings[0]

    class G:
        name, hidden_size, expert_intermediate_size = "other", 2048, 1024

    assert hw.timings_for(G) is mt
    assert mt.attention_router.at(1, 128) == pytest.approx(1e-4)
    assert mt.attention_router.at(4, 576) == pytest.approx(3.5e-4)
    bad = copy.deepcopy(doc)
    bad["model_timings"]["attention_router"]["seconds"] = [[1e-4]]
    with pytest.raises(ProfileError, match=r"model_timings\[0\]\.attention_router\.seconds"):
        profile_from_dict(bad, "x")
    # the CPU device's calibration: per batch, and its overheads; bad values named in one line
    row = {"batch": 1, "expert_ffn": {"tokens": [1], "seconds": [2e-4], "source": "measured"},
           "miss_overhead_s": 1e-4}
    doc["model_timings"]["by_batch"] = [row, {**row, "batch": 4}]
    doc["model_timings"]["disk_read_overhead_s"] = 3e-4
    mt = profile_from_dict(doc, "x").model_timings[0]
    assert [b.batch for b in mt.by_batch] == [1, 4] and mt.disk_read_overhead_s == 3e-4
    assert mt.host_miss_overhead_s is None and mt.decode_miss_overhead_s is None
    for edit, match in [(lambda t: t["by_batch"].reverse(), r"by_batch\.batch' must be strictly"),
                        (lambda t: t.update(host_miss_overhead_s=-1.0),
                         r"host_miss_overhead_s' must be >= 0"),
                        (lambda t: t["by_batch"][0].pop("expert_ffn"),
                         r"by_batch\[0\]\.expert_ffn' is missing"),
                        (lambda t: t["by_batch"][0].update(batch=0.5),
                         r"by_batch\[0\]\.batch' must be a whole number >= 1"),
                        (lambda t: t.update(by_batch={}), r"by_batch' must be a list")]:
        bad = copy.deepcopy(doc)
        edit(bad["model_timings"])
        with pytest.raises(ProfileError, match=match):
            profile_from_dict(bad, "x")


def test_curves_interpolate():
    c = LevelCurve((0.1, 1.0), (100.0, 200.0), "measured")
    assert c.at(0.01) == 100.0 and c.at(10) == 200.0
    assert c.at(10 ** -0.5) == pytest.approx(150.0)  # halfway in log(level)
    t = TokenCurve((1, 4, 8), (1.0, 1.0, 3.0), "measured")
    assert t.at(0.5) == 1.0 and t.at(6) == pytest.approx(2.0) and t.at(16) == pytest.approx(7.0)
    a = AttentionTimings((1,), (10,), ((0.5,),), "measured")
    assert a.at(3, 99) == 0.5


_CURVE = {"sizes": [4096, 1 << 20], "depths": [1, 4], "gbps": [[0.05, 0.1], [1.0, 2.0]],
          "best_depth": 4, "method": "O_DIRECT", "source": "measured"}


@pytest.mark.parametrize("edit,field", [
    (lambda d: d["host"]["disk_curve"].update(best_depth=0.5), r"host\.disk_curve\.best_depth"),
    (lambda d: d["host"]["disk_curve"].update(depths=[0.5, 4]), r"host\.disk_curve\.depths\[0\]"),
    (lambda d: d["host"]["disk_curve"].update(sizes=[0.25, 4096]),
     r"host\.disk_curve\.sizes\[0\]"),
    (lambda d: d["host"]["disk_curve"].update(best_depth=2.5), r"host\.disk_curve\.best_depth"),
    (lambda d: d["gpu"].update(threads=0.5), r"gpu\.threads"),
    (lambda d: d["host"]["codecs"]["sz3"].update(
        threads={"threads": [0.5, 2], "speedup": [1.0, 1.5], "source": "measured"}),
     r"host\.codecs\.sz3\.threads\.threads\[0\]"),
])
def test_counts_in_the_new_profile_fields_must_be_whole_numbers(tmp_path, edit, field):
    """Reads in flight, request sizes and thread counts are counts: 0.5 reads in flight is not
    silently 0 (a disk server that never serves, a pool of no threads)."""
    doc = _doc()
    doc["host"]["disk_curve"] = json.loads(json.dumps(_CURVE))
    edit(doc)
    with pytest.raises(ProfileError, match=field + r"' must be a whole number >= 1"):
        load_hardware(_write(tmp_path, doc))
