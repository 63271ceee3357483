"""Gate and up stored apart on models that fuse them in memory (issue 17): each architecture's
order inside `gate_up_proj` (halves, or gpt_oss's interleaving), exact split and join, and a
gate/up/down policy through the in-memory round trip, pack and the runtime, bit for bit.

Logits are compared bit for bit on olmoe (gate rows first, the convention of mixtral, qwen and
deepseek too) and gpt_oss (interleaved columns, bias likewise); on mixtral, whose grouped product
in transformers differs from the runtime's by an ulp whatever the policy
(tests/profiles/test_runtime_matrices.py), the decoded weights are compared.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from profiles.errors import PolicyError
from profiles.models import load_model
from profiles.models.expert_map import build_expert_map
from profiles.models.gate_up import LAYOUTS, PARTS, gate_up_layout, join_expert, split_expert
from profiles.packed import pack, read_packed
from profiles.policy import Policy, StorageSpec, apply_policy
from profiles.runtime import greedy_generate, measure_throughput, synthetic_prompt
from profiles.runtime.device_decode import decode_payload
from profiles.runtime.store import ExpertStore
from profiles.serving import ServingConfig
from tests.fixtures_models import ARCHITECTURES, model_cache, save_tiny_model, tiny_model

STEPS, PROMPT = 6, 5
SZP, RTN8, LOSSLESS = (StorageSpec.parse(t) for t in ("szp:meanabs:1", "rtn8", "lossless"))
# gate int8, up error-bounded, down lossless; layer 1's up falls back to its gate_up entry
GATE_UP_DOWN = Policy(default=SZP, matrices={(None, None, "gate"): RTN8,
                                             (None, None, "down"): LOSSLESS,
                                             (1, None, "up"): StorageSpec.parse("szp:meanabs:2")})
GATE_ONLY = Policy(default=SZP, matrices={(None, None, "gate"): RTN8})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory)


def _zero_part(mod, layout, part: int) -> None:
    with torch.no_grad():
        for name in PARTS:
            p = getattr(mod, name, None)
            if p is not None:
                for e in range(p.shape[0]):
                    layout.split(name, p[e])[part].zero_()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architectures_gate_is_where_its_layout_says(arch):
    # a zero gate (weight and bias) zeroes act(gate) in every architecture (silu(0) = 0; gpt_oss's
    # gate * sigmoid(alpha * gate) = 0), so the experts' output no longer depends on the input;
    # the other order (halves <-> interleaved) leaves half the gates and the output moves
    layout = gate_up_layout(arch)
    idx, w = torch.randint(0, 4, (5, 2), generator=torch.Generator().manual_seed(0)), \
        torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    for lay, independent in ((layout, True),
                             (dataclasses.replace(layout, interleaved=not layout.interleaved),
                              False)):
        m = tiny_model(arch)
        emap = build_expert_map(m)
        mod = emap.expert_modules[emap.moe_layers[0]]
        _zero_part(mod, lay, 0)
        a, b = (mod(torch.randn(5, 32, generator=torch.Generator().manual_seed(s)), idx, w)
                for s in (2, 3))
        assert torch.equal(a, b) is independent


def test_llama4_gate_is_the_first_half_of_its_columns():
    # llama4 is not among the tiny test models (its experts module takes no routing arguments);
    # its experts module alone checks the layout the same way
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    cfg = Llama4TextConfig(hidden_size=32, intermediate_size=24, num_local_experts=4,
                           hidden_act="silu")
    layout = gate_up_layout(cfg.model_type)
    for lay, independent in ((layout, True), (dataclasses.replace(layout, interleaved=True),
                                              False)):
        torch.manual_seed(0)
        mod = Llama4TextExperts(cfg)
        with torch.no_grad():
            mod.gate_up_proj.normal_()
            mod.down_proj.normal_()
        _zero_part(mod, lay, 0)
        a, b = mod(torch.randn(8, 32)), mod(torch.randn(8, 32))
        assert torch.equal(a, b) is independent


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4"])
def test_split_then_join_gives_the_fused_tensors_back_bit_for_bit(arch):
    layout = LAYOUTS[arch]
    shape = (16, 24) if layout.transposed else (24, 16)   # [in, 2I] or [2I, in]
    tensors = {"gate_up_proj": torch.randn(shape), "gate_up_proj_bias": torch.randn(24),
               "down_proj": torch.randn(12, 16)}
    parts = split_expert(tensors, layout)
    assert list(parts) == ["gate_proj", "up_proj", "gate_proj_bias", "up_proj_bias", "down_proj"]
    assert parts["gate_proj"].numel() == parts["up_proj"].numel() == 16 * 12
    if arch == "gpt_oss":
        assert torch.equal(parts["gate_proj"], tensors["gate_up_proj"][:, ::2])
        assert torch.equal(parts["up_proj_bias"], tensors["gate_up_proj_bias"][1::2])
    joined = join_expert(parts, layout)
    assert list(joined) == ["gate_up_proj", "gate_up_proj_bias", "down_proj"]
    assert all(torch.equal(joined[n], tensors[n]) for n in tensors)


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_gate_up_down_policy_runtime_logits_equal_the_round_trip_bit_for_bit(models, arch,
                                                                             tmp_path):
    lm = models(arch)
    ids = synthetic_prompt(1, PROMPT, lm.geometry.vocab_size, seed=1)
    with apply_policy(lm, GATE_UP_DOWN) as report:
        ref = greedy_generate(lm.model, ids, STEPS, record_logits=True)
    ckpt = pack(lm, GATE_UP_DOWN, tmp_path / "ckpt")
    assert ckpt.stored_expert_bytes == report.stored_bytes + sum(   # + alignment padding
        e.size - sum(b.size for b in e.blobs) for e in ckpt.experts)
    disk = ServingConfig(gpu_mem_fraction=0.5, prompt_tokens=PROMPT, generated_tokens=STEPS,
                         host_mem_bytes=ckpt.stored_expert_bytes // 3)   # the disk tier
    for source, policy, serving in ((lm, GATE_UP_DOWN, _serving()), (ckpt.path, None, _serving()),
                                    (ckpt.path, None, disk)):
        got = measure_throughput(source, policy, serving, prompt_ids=ids, record_logits=True,
                                 device="cpu")
        assert got.misses > 0
        assert any(n.startswith("disk tier") for n in got.notes) is (serving is disk)
        assert got.output_ids == ref.ids.tolist()
        assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))
    # gate_up stored whole at szp gives other logits: the split really changed what ran
    with apply_policy(lm, Policy(default=SZP, matrices={(None, None, "down"): LOSSLESS})):
        fused = greedy_generate(lm.model, ids, STEPS, record_logits=True)
    assert not all(torch.equal(a, b) for a, b in zip(ref.logits, fused.logits))


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "gpt_oss"])
def test_each_part_is_its_own_blob_and_decodes_to_the_round_trip_weights(models, arch, tmp_path):
    lm = models(arch)
    layout = gate_up_layout(arch)
    ckpt = read_packed(pack(lm, GATE_UP_DOWN, tmp_path / "ckpt").path, verify=True)
    stores = [ExpertStore.from_loaded(lm, GATE_UP_DOWN), ExpertStore.from_packed(ckpt)]
    bias = arch == "gpt_oss"
    with apply_policy(lm, GATE_UP_DOWN):
        for ref in lm.expert_map.experts:
            up = StorageSpec.parse("szp:meanabs:2").describe() if ref.layer == 1 \
                else SZP.describe()
            want = {"gate_proj": "rtn8", "up_proj": up.split(":")[0], "down_proj": "lossless"}
            for store in stores:
                rec = store[(ref.layer, ref.expert)]
                upd = f";up={up}" if ref.layer == 1 else ""   # listed where it differs
                assert rec.spec == f"gate_up={SZP.describe()};gate=rtn8{upd};down=" \
                                   f"{LOSSLESS.describe()}"
                names = [t.name for t in rec.tensors]
                assert names == (["gate_proj", "up_proj", "gate_proj_bias", "up_proj_bias",
                                  "down_proj", "down_proj_bias"] if bias
                                 else ["gate_proj", "up_proj", "down_proj"])
                for t in rec.tensors:
                    assert t.blob.codec == want[t.name.replace("_bias", "")]
                got = rec.join({t.name: decode_payload(t.blob, None, torch.device("cpu"))
                                for t in rec.tensors})
                for name, value in got.items():
                    assert torch.equal(value.view(torch.uint8),
                                       ref.tensors[name].contiguous().view(torch.uint8))
    # the round trip changed gate and up as their own codecs say
    if layout is not None:
        e0 = lm.expert_map.experts[0]
        gate, up = layout.split("gate_up_proj", e0.tensors["gate_up_proj"])
        with apply_policy(lm, GATE_UP_DOWN):
            g2, u2 = (x.clone() for x in layout.split("gate_up_proj", e0.tensors["gate_up_proj"]))
        assert not torch.equal(g2, gate) and not torch.equal(u2, up)


def test_a_gate_only_override_leaves_up_at_the_gate_up_spec(models):
    from profiles.codecs import roundtrip

    lm = models("gpt_oss")
    layout = gate_up_layout("gpt_oss")
    ref = lm.expert_map.experts[0]
    specs = GATE_ONLY.expert_specs(ref.layer, ref.expert)
    assert (specs.gate, specs.up, specs.gate_up, specs.down) == (RTN8, SZP, SZP, SZP)
    assert specs.describe() == f"gate_up={SZP.describe()};gate=rtn8;down={SZP.describe()}"
    parts = {n: t.clone() for n, t in split_expert(ref.tensors, layout).items()}
    want = {n: roundtrip(t, **({"codec": "rtn8"} if n.startswith("gate_proj") else
                               dict(codec="szp", mode="meanabs", level=1.0)))[0]
            for n, t in parts.items()}
    with apply_policy(lm, GATE_ONLY):
        got = split_expert(ref.tensors, layout)
        assert all(torch.equal(got[n], want[n]) for n in want)
    store = ExpertStore.from_loaded(lm, GATE_ONLY)
    codecs = {t.name: t.blob.codec for t in store[(ref.layer, ref.expert)].tensors}
    assert codecs == {"gate_proj": "rtn8", "gate_proj_bias": "rtn8", "up_proj": "szp",
                      "up_proj_bias": "szp", "down_proj": "szp", "down_proj_bias": "szp"}


def test_gate_equal_to_gate_up_keeps_gate_up_whole(models):
    lm = models("olmoe")
    store = ExpertStore.from_loaded(lm, Policy(default=SZP, matrices={(None, None, "gate"): SZP}))
    assert [t.name for t in store[(0, 0)].tensors] == ["gate_up_proj", "down_proj"]


def test_gate_on_an_architecture_of_unknown_layout_is_refused_in_one_line(models):
    lm = models("olmoe")
    names = [n for n, _ in lm.geometry.expert_tensor_shapes]
    with pytest.raises(PolicyError, match=r"^policy names matrix 'gate' or 'up', but moesz does "
                                          r"not know how a mystery model orders gate and up "
                                          r"inside its fused gate_up_proj \(known: .*gpt_oss.*\); "
                                          r"use 'gate_up'$"):
        GATE_ONLY.check(lm.expert_map.moe_layers, 4, None, tensor_names=names,
                        architecture="mystery")
    GATE_ONLY.check(lm.expert_map.moe_layers, 4, None, tensor_names=names, architecture="olmoe")


def test_gate_up_down_policy_served_from_disk_equals_in_memory(models, tmp_path):
    src = save_tiny_model("gpt_oss", tmp_path / "m")
    lm = models("gpt_oss")
    ids = synthetic_prompt(1, PROMPT, lm.geometry.vocab_size, seed=1)
    with apply_policy(lm, GATE_UP_DOWN) as mem:
        ref = greedy_generate(lm.model, ids, STEPS, record_logits=True)
    disk = load_model(str(src), host_mem=1 << 20)
    with apply_policy(disk, GATE_UP_DOWN) as rep:
        got = greedy_generate(disk.model, ids, STEPS, record_logits=True)
    assert rep.stored_bytes == mem.stored_bytes
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))


def _serving():
    return ServingConfig(gpu_mem_fraction=0.5, prompt_tokens=PROMPT, generated_tokens=STEPS)


def test_gpt_oss_shipped_mxfp4_keeps_a_raw_up_as_shipped_beside_a_compressed_gate(tmp_path):
    # raw on a checkpoint shipped MXFP4 stores the shipped blocks; the up part is whole columns
    # of the [in, out] matrix, so its blocks re-encode exactly as shipped
    from profiles.codecs import decode
    from tests.fixtures_models import save_tiny_mxfp4_gpt_oss

    policy = Policy(matrices={(None, None, "gate"): RTN8})
    ckpt = read_packed(pack(str(save_tiny_mxfp4_gpt_oss(tmp_path / "m")), policy,
                            tmp_path / "ck").path)
    lm = load_model(str(tmp_path / "m"))
    store = ExpertStore.from_packed(ckpt)
    layout = gate_up_layout("gpt_oss")
    for ref in lm.expert_map.experts[:4]:
        rec = store[(ref.layer, ref.expert)]
        codecs = {t.name: t.blob.codec for t in rec.tensors}
        assert codecs["gate_proj"] == "rtn8" and codecs["up_proj"] == "mxfp4"
        up = decode(next(t.blob for t in rec.tensors if t.name == "up_proj"))
        assert torch.equal(up, layout.split("gate_up_proj", ref.tensors["gate_up_proj"])[1])


def test_a_raw_record_with_gate_and_up_apart_is_joined_after_its_copy(models):
    # gate, up and down raw beside a compressed gate_up: every blob is raw, but the join reads
    # the copied bytes, so it must run as a decode does (on CUDA: on the decode stream, after
    # the copy's event), not as the views-only path of a raw record; on the CPU that path is
    # the one the timeline records on the decode track
    from profiles.runtime.timeline import Job, Timeline
    from profiles.runtime.transfers import Transfers

    lm = models("olmoe")
    policy = Policy(default=SZP, matrices={(None, None, k): StorageSpec()
                                           for k in ("gate", "up", "down")})
    rec = ExpertStore.from_loaded(lm, policy)[(0, 0)]
    assert rec.codecs == ("raw",) and rec.joins
    tl = Timeline(torch.device("cpu"))
    tr = Transfers(torch.device("cpu"), tl)
    try:
        weights, _ = tr.decode(rec, rec.host.clone(), Job("fetch", (0, 0)))
    finally:
        tr.close()
    assert [s[0] for s in tl.spans()] == [tr.decode_track]
    ref = lm.expert_map.experts[0].tensors
    assert all(torch.equal(weights[n], ref[n]) for n in ref)
