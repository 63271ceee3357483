"""gpt-oss checkpoints that ship their experts in MXFP4 (`*_blocks` / `*_scales`), read natively:
layout, exact dequantization (bit for bit transformers'), geometry, fingerprint, policies, pack and
the runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from profiles.codecs import roundtrip
from profiles.codecs.mxfp4 import decode_gpt_oss, to_gpt_oss
from profiles.errors import ModelError
from profiles.models import checkpoint_info, load_model, resolve_geometry
from profiles.models.layout import read_expert_tensor
from profiles.packed import load_packed, pack
from profiles.policy import Policy, StorageSpec, apply_policy
from profiles.runtime import greedy_generate, measure_throughput, synthetic_prompt
from profiles.serving import ServingConfig
from tests.fixtures_models import MXFP4_WIDTH as W
from tests.fixtures_models import save_tiny_mxfp4_gpt_oss

MIXED = Policy(default=StorageSpec("raw"), layers={0: StorageSpec.parse("q4_k"),
                                                   1: StorageSpec("szp", "meanabs", 1.0)})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_mxfp4_gpt_oss(tmp_path_factory.mktemp("oss") / "ckpt")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(str(ckpt))


def _transformers_dequant(blocks, scales):
    """transformers' own gpt-oss MXFP4 dequantization ([E, in, out] bf16)."""
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    return _convert_moe_packed_tensors(blocks, scales)


def test_layout_maps_blocks_and_scales_to_expert_tensors(ckpt):
    info = checkpoint_info(str(ckpt))
    lay = info.layout
    assert lay.kind == "fused" and lay.experts_per_layer == 4 and lay.moe_layers == (0, 1, 2)
    gate_up = next(t for t in lay.experts[(1, 2)] if t.name == "gate_up_proj")
    assert gate_up.format == "mxfp4" and gate_up.dtype == "MXFP4"
    assert gate_up.shape == (W, 2 * W)                       # in memory: [in, out]
    assert [p.tensor.rsplit(".", 1)[1] for p in gate_up.parts] == ["gate_up_proj_blocks",
                                                                  "gate_up_proj_scales"]
    assert gate_up.stored_bytes == 2 * W * (W // 32) * 16 + 2 * W * (W // 32)
    assert {"mlp.experts.gate_up_proj_blocks", "mlp.experts.down_proj_scales"} <= {
        n.split("layers.0.")[1] for n in lay.routed if "layers.0." in n}


def test_read_expert_tensor_equals_transformers_dequantization_bit_for_bit(ckpt):
    info = checkpoint_info(str(ckpt))
    raw = load_file(ckpt / "model.safetensors")
    for target in ("gate_up_proj", "down_proj"):
        pre = f"model.layers.2.mlp.experts.{target}"
        want = _transformers_dequant(raw[pre + "_blocks"], raw[pre + "_scales"])
        for e in range(4):
            t = next(x for x in info.layout.experts[(2, e)] if x.name == target)
            got = read_expert_tensor(info.files, t)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got.view(torch.int16), want[e].view(torch.int16)), (target, e)


def test_gpt_oss_layout_round_trips_and_keeps_negative_zero():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    w[3, :32] = 0.0
    w[4, :32] = -0.0
    blocks, scales = to_gpt_oss(w)
    assert blocks.shape == (64, 3, 16) and scales.shape == (64, 3)
    out = decode_gpt_oss(torch.from_numpy(blocks[None]).reshape(64, 3, 16),
                         torch.from_numpy(scales))
    want = _transformers_dequant(torch.from_numpy(blocks[None]), torch.from_numpy(scales[None]))
    assert torch.equal(out.view(torch.int16), want[0].view(torch.int16))
    with pytest.raises(ValueError, match="divisible by 32"):
        to_gpt_oss(w[:, :40])


def test_load_model_holds_the_exact_dequantized_experts(ckpt, loaded):
    raw = load_file(ckpt / "model.safetensors")
    exp = loaded.model.model.layers[1].mlp.experts
    want = _transformers_dequant(raw["model.layers.1.mlp.experts.down_proj_blocks"],
                                 raw["model.layers.1.mlp.experts.down_proj_scales"])
    assert torch.equal(exp.down_proj.data.view(torch.int16), want.view(torch.int16))
    g = loaded.geometry
    assert g.dtype == "mxfp4"
    # stored bytes as shipped: blocks + scales of both matrices and the bf16 biases
    assert g.bytes_per_expert == (2 * W * W + W * W) * 17 // 32 + 2 * (2 * W + W)
    assert g == resolve_geometry(str(ckpt))
    assert loaded.fingerprint == checkpoint_info(str(ckpt)).fingerprint


def test_the_fingerprint_samples_the_shipped_blocks(ckpt, tmp_path):
    other = save_tiny_mxfp4_gpt_oss(tmp_path / "other", seed=1)
    assert checkpoint_info(str(other)).fingerprint != checkpoint_info(str(ckpt)).fingerprint
    # the same weights with one block byte changed
    t = load_file(ckpt / "model.safetensors")
    key = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    t[key] = t[key].clone()
    t[key].view(-1)[0] ^= 0x11
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(ckpt, changed)
    save_file(t, changed / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_info(str(changed)).fingerprint != checkpoint_info(str(ckpt)).fingerprint


def test_mxfp4_columns_reencodes_the_shipped_experts_exactly(loaded):
    for ref in loaded.expert_map.experts:
        for name, t in ref.tensors.items():
            if t.dim() != 2:
                continue
            back, blob = roundtrip(t, "mxfp4", None, None, blocks="columns")
            # equal values; bit for bit except the sign of zero (GGUF's decoder, which moesz's
            # `mxfp4` equals, gives code 8 as +0.0 where gpt-oss's gives -0.0)
            assert torch.equal(back, t), (ref.layer, name)
            nz = t != 0
            assert torch.equal(back.view(torch.int16)[nz], t.view(torch.int16)[nz])
            assert blob.payload_nbytes == t.numel() * 17 // 32       # the shipped bytes
            assert blob.abs_bound == 0.0
    # blocks along the flattened rows group other values: not exact
    t = loaded.expert_map.experts[0].tensors["gate_up_proj"]
    assert not torch.equal(roundtrip(t, "mxfp4", None, None)[0], t)


def test_incomplete_mxfp4_experts_are_one_line(ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    t = load_file(bad / "model.safetensors")
    del t["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="layer 1 has MXFP4 down_proj_blocks without "
                                         "down_proj_scales"):
        checkpoint_info(str(bad))
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    shutil.copytree(ckpt, tmp_path / "noq")
    (tmp_path / "noq" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no MXFP4 quantization_config.*MXFP4 \\*_blocks"):
        resolve_geometry(str(tmp_path / "noq"))


def test_a_policy_applies_and_the_originals_come_back(loaded):
    before = loaded.expert_map.experts[0].tensors["gate_up_proj"].clone()
    with apply_policy(loaded, Policy.uniform("szp", "meanabs", 1.0)) as report:
        assert not torch.equal(loaded.expert_map.experts[0].tensors["gate_up_proj"], before)
        # ratios against the shipped MXFP4 bytes
        assert all(r.original_bytes == loaded.geometry.bytes_per_expert for r in report.experts)
    assert torch.equal(loaded.expert_map.experts[0].tensors["gate_up_proj"], before)


def test_pack_keeps_raw_experts_as_shipped(ckpt, loaded, tmp_path):
    packed = pack(str(ckpt), Policy.none(loaded.fingerprint), tmp_path / "raw")
    totals = packed.manifest["totals"]
    shipped = loaded.geometry.bytes_per_expert * 12
    assert totals["checkpoint_expert_bytes"] == shipped and totals["checkpoint_dtype"] == "mxfp4"
    # the shipped blocks and scales plus one blob header per tensor, not bf16 (3.6x more)
    assert shipped <= totals["stored_expert_bytes"] < 1.2 * shipped
    back = load_packed(packed.path)
    for ref in loaded.expert_map.experts:
        got = back.expert_map.get(ref.layer, ref.expert)
        assert all(torch.equal(got.tensors[n], t) for n, t in ref.tensors.items())


def test_a_mixed_plan_packs_and_runs_with_the_in_memory_logits(ckpt, loaded, tmp_path):
    """q4_k in layer 0, szp under a bound in layer 1, the shipped MXFP4 in layer 2: pack, then
    the offloaded runtime on the packed directory gives the tokens and logits of the in-memory
    round trip."""
    policy = Policy(fingerprint=loaded.fingerprint, default=MIXED.default,
                    layers=dict(MIXED.layers))
    packed = pack(str(ckpt), policy, tmp_path / "mixed")
    assert {e.spec for e in packed.experts} == {"q4_k", "szp:meanabs:1,variant=fixed", "raw"}
    ids = synthetic_prompt(1, 5, loaded.geometry.vocab_size, seed=1)
    with apply_policy(loaded, policy):
        ref = greedy_generate(loaded.model, ids, 6, record_logits=True)
    serving = ServingConfig(gpu_mem_fraction=0.5, prompt_tokens=5, generated_tokens=6)
    got = measure_throughput(packed.path, None, serving, prompt_ids=ids, record_logits=True,
                             device="cpu")
    assert got.output_ids == ref.ids.tolist() and got.misses > 0
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=0)


def test_experts_served_from_disk_give_the_in_memory_logits(ckpt, loaded):
    """--host-mem: the routed MXFP4 experts stay in the files and are dequantized when their
    layer runs; the logits are bit for bit those of the model in memory."""
    off = load_model(str(ckpt), host_mem=8 << 10)
    ids = synthetic_prompt(1, 6, loaded.geometry.vocab_size, seed=2)
    with torch.no_grad():
        assert torch.equal(off.model(ids).logits, loaded.model(ids).logits)
    assert off.fingerprint == loaded.fingerprint and off.geometry == loaded.geometry


def test_a_decoded_mxfp4_expert_is_held_in_bf16_by_simulator_and_runtime(loaded):
    """The GPU cache holds decoded experts in bf16 (3.6x the shipped bytes): the simulator's
    resident bytes are the runtime's records' decoded bytes; held compressed, the shipped ones."""
    from profiles.hardware import load_hardware
    from profiles.runtime.store import ExpertStore
    from sim.costs import GPU, build_costs
    from sim.ratios import SyntheticRatios

    g, hw = loaded.geometry, load_hardware("preset:h200-published")
    store = ExpertStore.from_loaded(loaded, Policy.none(loaded.fingerprint))
    decoded = {r.original_nbytes for r in store.records.values()}
    assert decoded == {2 * sum(t.numel() for t in loaded.expert_map.experts[0].tensors.values())}
    costs = build_costs(g, Policy.none(), hw, ServingConfig(gpu_mem_fraction=0.5),
                        SyntheticRatios())
    assert set(costs.resident_bytes.ravel().tolist()) == decoded
    assert (costs.decode_where == GPU).all() and (costs.link_bytes == g.bytes_per_expert).all()
    held = build_costs(g, Policy.none(), hw, ServingConfig(gpu_mem_fraction=0.5,
                                                          resident_form="compressed"),
                       SyntheticRatios())
    assert (held.resident_bytes == g.bytes_per_expert).all() and (held.hit_decode_s > 0).all()
