"""`moesz pack` and `moesz run` on a tiny model, and the simulator fed with what a run measured."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app
from sim.replay import predict_for_run, trace_document
from profiles.hardware import load_hardware
from profiles.models import load_model
from profiles.policy import Policy
from profiles.runtime import measure_throughput, synthetic_prompt
from profiles.serving import ServingConfig
from tests.fixtures_models import save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe"))


@pytest.fixture(scope="module")
def packed_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "ckpt"
    res = runner.invoke(app, ["pack", str(tiny_dir), "--uniform", "szp:meanabs:0.5",
                              "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["host_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert doc["ratio"] > 1
    return out


def test_run_reports_measured_figures_and_writes_a_perfetto_trace(packed_dir, tmp_path):
    trace = tmp_path / "run.json"
    res = runner.invoke(app, ["run", str(packed_dir), "--gpu-mem", "40%", "--prompt", "4",
                              "--tokens", "4", "--device", "cpu", "--json",
                              "--trace-out", str(trace)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    for key in ("tokens_per_s", "tpot_s", "bytes_h2d", "hit_rate", "misses", "measurement"):
        assert key in doc
    assert doc["steps"] == 4 and doc["tokens_per_s"] > 0
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"H2D link", "GPU compute", "GPU decode", "steps"} <= names
    assert any(e.get("name", "").startswith("fetch L") for e in events)
    procs = [e["args"]["name"] for e in events if e.get("name") == "process_name"]
    assert procs == ["moesz runtime (measured on cpu)"]


def test_run_refuses_a_plan_for_another_model(packed_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"kind": "plan", "schema_version": 1, "policy": Policy.uniform(
        "szp", "meanabs", 0.5, fingerprint="fp2:0123456789abcdef").to_dict()}))
    res = runner.invoke(app, ["run", str(packed_dir), "--policy", str(plan), "--tokens", "2",
                              "--device", "cpu"])
    assert res.exit_code == 1
    assert res.output.startswith("error:") and "fingerprint" in res.output


def test_pack_refuses_missing_policy(tiny_dir, tmp_path):
    res = runner.invoke(app, ["pack", str(tiny_dir), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "--policy" in res.output


@pytest.mark.parametrize("cache", ["lru", "lfu", "static-hot"])
def test_simulator_sees_the_same_cache_traffic_for_the_same_routing(tiny_dir, cache):
    """Same routing, sizes, budget and cache policy, no prefetch: the simulator's hits, misses and
    bytes moved equal the runtime's exactly (the cache logic is shared and mirrored)."""
    lm = load_model(str(tiny_dir))
    ids = synthetic_prompt(1, 5, lm.geometry.vocab_size, seed=3)
    sv = ServingConfig(gpu_mem_fraction=0.4, cache_policy=cache, prompt_tokens=5,
                       generated_tokens=8)
    r = measure_throughput(lm, Policy.uniform("szp", "meanabs", 0.5), sv, prompt_ids=ids,
                           device="cpu")
    sim = predict_for_run(r, load_hardware("preset:h200-published"), record=True)
    p = sim.result
    assert (p.hits, p.misses) == (r.hits, r.misses)
    assert p.bytes_h2d == r.bytes_h2d
    assert p.cache_capacity_bytes == r.cache_capacity_bytes
    doc = trace_document(r, sim)
    procs = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e.get("name") == "process_name"}
    assert procs == {1: "moesz runtime (measured on cpu)", 2: "moesz simulation (predicted)"}


def test_static_hot_ranked_by_placement_traces_runtime_and_simulator_agree(tiny_dir, tmp_path):
    """`placement_traces` makes the runtime pin the experts other traces use most; the simulator,
    fed the run, ranks by the same file and sees the same hits, misses and bytes."""
    from profiles.traces import write_traces

    lm = load_model(str(tiny_dir))
    sv = ServingConfig(gpu_mem_fraction=0.4, cache_policy="static-hot", prompt_tokens=5,
                       generated_tokens=8)
    pol = Policy.uniform("szp", "meanabs", 0.5)
    ids = synthetic_prompt(1, 5, lm.geometry.vocab_size, seed=3)
    oracle = measure_throughput(lm, pol, sv, prompt_ids=ids, device="cpu")
    frame = oracle.routing_frame()
    E = lm.geometry.experts_per_layer
    path = tmp_path / "placement.parquet"
    write_traces(frame.assign(expert=E - 1 - frame["expert"]), path)  # its hot experts go cold
    placed = measure_throughput(lm, pol, sv, prompt_ids=ids, device="cpu",
                                placement_traces=str(path))
    assert placed.placement_traces == str(path) and any(str(path) in n for n in placed.notes)
    assert placed.hits < oracle.hits
    p = predict_for_run(placed, load_hardware("preset:h200-published")).result
    assert (p.hits, p.misses, p.bytes_h2d) == (placed.hits, placed.misses, placed.bytes_h2d)


def _cpu_profile(tmp_path):
    """A CPU-device profile with round figures (szp decoded in place, a disk depth curve)."""
    from tests.sim.conftest import HW_DOC

    import copy

    doc = copy.deepcopy(HW_DOC)
    doc["gpu"]["device_type"] = "cpu"
    doc["host"]["disk_curve"] = {"sizes": [4096, 1 << 20], "depths": [1, 4],
                                 "gbps": [[0.05, 0.1], [1.0, 2.0]], "best_depth": 4,
                                 "method": "O_DIRECT", "source": "measured"}
    doc["model_timings"] = []
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("depth, resident", [(1, "decompressed"), (3, "decompressed"),
                                             (3, "compressed")])
def test_the_disk_tier_reads_exactly_the_bytes_the_simulator_predicts(packed_dir, tmp_path,
                                                                      depth, resident):
    """A host budget below the packed experts: the runtime reads missing records from the layer
    files (page cache bypassed, `depth` in flight); the simulator, fed the run, predicts the same
    hits, misses, disk reads and bytes on each tier."""
    from profiles.packed import read_packed

    ckpt = read_packed(packed_dir)
    sv = ServingConfig(gpu_mem_fraction=0.3, host_mem_bytes=ckpt.stored_expert_bytes // 3,
                       prompt_tokens=4, generated_tokens=8, disk_depth=depth,
                       resident_form=resident)
    r = measure_throughput(packed_dir, None, sv, device="cpu")
    assert r.disk_reads > 0 and r.bytes_disk > 0 and r.config["disk_depth"] == depth
    assert any(f"{depth} reads in flight" in n for n in r.notes)
    p = predict_for_run(r, load_hardware(_cpu_profile(tmp_path))).result
    assert (p.hits, p.misses, p.bytes_h2d) == (r.hits, r.misses, r.bytes_h2d)
    assert (p.ssd_reads, p.bytes_ssd) == (r.disk_reads, r.bytes_disk)
    assert p.disk_depth == depth and 0 < r.disk_busy_fraction <= 1


def test_experts_run_on_the_cpu_from_the_disk_tier_are_read_once(packed_dir, tmp_path):
    """on_miss cpu under a small host budget: a missed expert's record, read for its background
    copy, is the one its CPU run uses (it was read a second time when the layer's other reads
    had pushed it out of the host LRU first); the simulator counts one read each."""
    from profiles.packed import read_packed

    ckpt = read_packed(packed_dir)
    sv = ServingConfig(gpu_mem_fraction=0.3, host_mem_bytes=ckpt.stored_expert_bytes // 3,
                       prompt_tokens=4, generated_tokens=8, disk_depth=3, on_miss="cpu")
    r = measure_throughput(packed_dir, None, sv, device="cpu")
    assert r.cpu_expert_runs > 0
    p = predict_for_run(r, load_hardware(_cpu_profile(tmp_path))).result
    assert (p.hits, p.misses, p.cpu_expert_runs) == (r.hits, r.misses, r.cpu_expert_runs)
    assert (p.ssd_reads, p.bytes_ssd) == (r.disk_reads, r.bytes_disk)


def test_run_predict_on_this_machine_prints_each_figure_with_its_error(packed_dir, tmp_path):
    from profiles.packed import read_packed

    hw = _cpu_profile(tmp_path)
    host = read_packed(packed_dir).stored_expert_bytes // 3
    res = runner.invoke(app, ["run", str(packed_dir), "--gpu-mem", "30%", "--host-mem",
                              str(host), "--prompt", "4", "--tokens", "4", "--device", "cpu",
                              "--predict", str(hw), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["config"]["disk_depth"] == 4           # the profile's best depth by default
    assert doc["predicted"]["disk_depth"] == 4
    err = doc["relative_error"]
    assert err["tokens/s (decode)"] == pytest.approx(
        (doc["predicted"]["tokens_per_s"] - doc["tokens_per_s"]) / doc["tokens_per_s"])
    assert err["bytes read from disk"] == 0.0 and err["misses (decode)"] == 0.0
    res = runner.invoke(app, ["run", str(packed_dir), "--gpu-mem", "30%", "--prompt", "4",
                              "--tokens", "4", "--device", "cpu", "--predict", str(hw)])
    assert res.exit_code == 0, res.output
    assert "error" in res.output and "disk busy fraction" in res.output


def test_run_predict_refuses_a_profile_of_another_machine(packed_dir, tmp_path):
    res = runner.invoke(app, ["run", str(packed_dir), "--tokens", "2", "--device", "cpu",
                              "--predict", "preset:h200-published"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "the run used cpu but preset:h200-published describes a GPU" in res.output
    old = json.loads(_cpu_profile(tmp_path).read_text())
    del old["gpu"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    res = runner.invoke(app, ["run", str(packed_dir), "--tokens", "2", "--device", "cpu",
                              "--predict", str(tmp_path / "old.json")])
    assert res.exit_code == 1 and "has no device section" in res.output
