"""Models evaluated with their routed experts on disk (`profiles.models.offload`): logits bit for
bit those of the model in memory, a policy's real blobs instead of edited weights, a host budget
that is kept, and packed checkpoints served the same way."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from planner.cli import app
from profiles.errors import ModelError, PolicyError
from profiles.models import load_model
from profiles.packed import pack
from profiles.policy import Policy, StorageSpec, apply_policy
from tests.fixtures_models import save_tiny_model

SZP = Policy(default=StorageSpec.parse("szp:meanabs:1"))
IDS = torch.tensor([[1, 5, 9, 3, 4, 7, 2, 2, 8, 11, 6, 4]])


def logits(loaded):
    with torch.no_grad():
        return loaded.model(IDS).logits


def test_builtin_from_disk_gives_the_in_memory_logits_bit_for_bit():
    memory, disk = load_model("builtin"), load_model("builtin", host_mem=150_000)
    assert torch.equal(logits(memory), logits(disk))
    s = disk.offload.stats
    assert s.reads > 0 and s.host_peak_bytes <= 150_000 and len(s.layers_seen) == 8
    with apply_policy(memory, SZP) as a:
        ref = logits(memory)
    with apply_policy(disk, SZP) as b:
        got = logits(disk)
    assert torch.equal(ref, got)
    assert a.stored_bytes == b.stored_bytes
    assert torch.equal(logits(disk), logits(memory))   # the policy is gone after the block


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_every_layout_from_disk(arch, tmp_path):
    path = save_tiny_model(arch, tmp_path / arch)
    memory, disk = load_model(str(path)), load_model(str(path), offload=True)
    assert torch.equal(logits(memory), logits(disk))


def test_packed_checkpoint_is_served_from_disk(tmp_path):
    path = save_tiny_model("qwen3_moe", tmp_path / "q")
    memory = load_model(str(path))
    ckpt = pack(str(path), SZP, tmp_path / "packed")
    disk = load_model(str(ckpt.path), host_mem=ckpt.stored_expert_bytes // 3)
    with apply_policy(memory, SZP):
        assert torch.equal(logits(memory), logits(disk))
    assert disk.fingerprint == memory.fingerprint
    with pytest.raises(PolicyError, match="packed checkpoint"):
        with apply_policy(disk, SZP):
            pass


def test_bad_offload_options(tmp_path):
    with pytest.raises(ModelError, match="--host-mem -1"):
        load_model("builtin", host_mem=-1)
    with pytest.raises(ModelError, match="drop --dtype"):
        load_model("builtin", host_mem=100, dtype="fp32")


def test_model_eval_with_host_mem_reports_disk_reads():
    r = CliRunner().invoke(app, ["model", "eval", "builtin", "--limit", "4", "--tasks", "sort",
                                 "--host-mem", "5%", "--uniform", "szp:meanabs:1", "--json"])
    assert r.exit_code == 0, r.output
    import json

    doc = json.loads(r.output)
    d = doc["experts_from_disk"]
    assert d["expert_reads"] > 0 and d["host_peak_bytes"] <= d["host_budget_bytes"]


@pytest.mark.slow
def test_profile_with_experts_on_disk_measures_what_memory_does(tmp_path):
    """Sensitivity profiled with the experts served from disk equals the in-memory profile at
    the same (native) arithmetic: same KL and answers, point by point."""
    import pandas as pd

    from profiles.profiling import ProfileRequest, profile_model

    kw = dict(codecs="szp", levels="2", layers="2", groups="none", limit=4, tasks="sort",
              compute_dtype="native")
    profile_model(ProfileRequest(model="builtin", out=tmp_path / "mem", **kw))
    profile_model(ProfileRequest(model="builtin", out=tmp_path / "disk", host_mem=300_000, **kw))
    a = pd.read_parquet(tmp_path / "mem" / "sensitivity.parquet").sort_values("point_key")
    b = pd.read_parquet(tmp_path / "disk" / "sensitivity.parquet").sort_values("point_key")
    cols = [c for c in ("point_key", "task", "content_change", "strict_change", "kl_mean")
            if c in a.columns]
    assert a[cols].reset_index(drop=True).equals(b[cols].reset_index(drop=True))
    ra = pd.read_parquet(tmp_path / "mem" / "ratios.parquet")
    rb = pd.read_parquet(tmp_path / "disk" / "ratios.parquet")
    assert ra.equals(rb)   # ratios read from the files, not the shared buffers


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc")
def test_packed_models_served_from_disk_close_their_layer_files(tmp_path):
    """Each packed model opened with experts on disk (a sweep, a server's reloads) reads its
    layer files through descriptors that go with it: none are left open after it is dropped."""
    import gc

    from profiles.models.offload import PackedReader

    path = save_tiny_model("qwen3_moe", tmp_path / "q")
    ckpt = pack(str(path), SZP, tmp_path / "packed")
    gc.collect()
    before = _open_fds()
    for _ in range(3):
        disk = load_model(str(ckpt.path), host_mem=1000)
        logits(disk)
        del disk
        reader = PackedReader(ckpt)
        reader.read((1, 0))
        reader.read((2, 3))
        del reader
    gc.collect()
    assert _open_fds() == before
    reader = PackedReader(ckpt)
    reader.read((1, 0))
    reader.close()
    assert _open_fds() == before


def _records_alive() -> int:
    import gc

    from profiles.models.offload import Record

    gc.collect()
    return sum(r.nbytes for r in gc.get_objects() if type(r) is Record)


def test_a_policy_block_keeps_the_host_budget():
    """--host-mem bounds the expert records in host memory while a policy is evaluated too
    (every perturbed point of a profile, validate, model eval --uniform): the records cached
    before the block, and the last one its size pass read, must not be held on top."""
    budget = 150_000
    disk = load_model("builtin", host_mem=budget)
    logits(disk)
    assert 0 < _records_alive() <= budget
    with apply_policy(disk, Policy(default=StorageSpec.parse("raw"))):
        assert _records_alive() <= budget
        logits(disk)
        assert _records_alive() <= budget
    logits(disk)
    assert _records_alive() <= budget


def test_the_routed_indices_are_found_however_the_experts_module_is_called(tmp_path):
    """The pre-hook fills the experts the call routes to, passed positionally or as
    `top_k_index=`; anything that is not an integer index tensor (a routing mask, scores) is
    refused in one line rather than read as expert numbers."""
    memory = load_model(str(save_tiny_model("gpt_oss", tmp_path / "g")))
    disk = load_model(str(tmp_path / "g"), offload=True)
    layer = disk.expert_map.moe_layers[0]
    mine, ref = disk.expert_map.expert_modules[layer], memory.expert_map.expert_modules[layer]
    torch.manual_seed(0)
    h = torch.randn(5, 32)
    idx = torch.tensor([[3, 1], [0, 3], [1, 2], [3, 0], [2, 1]])
    w = torch.softmax(torch.randn(5, 2), dim=-1)
    with torch.no_grad():
        want = ref(h, idx, w)
        for args, kw in (((h, idx, w), {}), ((h,), {"top_k_index": idx, "top_k_weights": w})):
            for buf in disk.offload.buffers.values():
                buf.fill_(float("nan"))
            assert torch.equal(mine(*args, **kw), want)
        mask = torch.zeros(5, 4, dtype=torch.bool).scatter_(1, idx, True)
        for bad in (idx.float(), mask):
            with pytest.raises(ModelError, match="needs the routed expert indices"):
                mine(h, bad, w)


def test_a_one_layer_policy_reads_only_that_layer_before_evaluating():
    """A sensitivity point perturbs one layer and stores the rest raw. The in-memory path leaves
    raw experts untouched; from disk, measuring their stored bytes must not read them either
    (a sweep of a 93 GB model read all 93 GB at every point)."""
    memory, disk = load_model("builtin"), load_model("builtin", host_mem=150_000)
    layer = disk.expert_map.moe_layers[3]
    policy = Policy(layers={layer: StorageSpec.parse("szp:meanabs:1")})
    reads = disk.offload.stats.reads
    with apply_policy(disk, policy) as b:
        assert disk.offload.stats.reads - reads == disk.expert_map.experts_per_layer
        got = logits(disk)
    with apply_policy(memory, policy) as a:
        assert torch.equal(logits(memory), got)
    assert a.stored_bytes == b.stored_bytes and a.ratio == b.ratio


def test_a_per_matrix_policy_from_disk_gives_the_in_memory_logits_bit_for_bit():
    # gate_up raw and down szp: the raw shortcut of the disk path must not take the whole expert
    memory, disk = load_model("builtin"), load_model("builtin", host_mem=150_000)
    policy = Policy(matrices={(None, None, "down"): StorageSpec.parse("szp:meanabs:2"),
                              (3, None, "gate_up"): StorageSpec.parse("rtn8")})
    with apply_policy(memory, policy) as a:
        ref = logits(memory)
    with apply_policy(disk, policy) as b:
        got = logits(disk)
    assert torch.equal(ref, got) and not torch.equal(ref, logits(memory))
    assert a.stored_bytes == b.stored_bytes
    assert [e.spec for e in a.experts] == [e.spec for e in b.experts]
