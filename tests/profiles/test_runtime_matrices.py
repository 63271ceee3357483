"""A per-matrix policy through pack and the offloaded runtime (issue 17): each matrix is its own
blob with its own codec, the runtime decodes each with that codec, and what it computes with is
what the in-memory round trip computes with, bit for bit.

Logits are compared bit for bit on olmoe and gpt_oss, whose per-expert products in the runtime are
the same arithmetic as transformers' (0.0 difference). On mixtral transformers' grouped product
differs from the runtime's per-expert one by a bf16 ulp (tests/profiles/test_runtime.py), for a
uniform policy as much as for a per-matrix one, so there the decoded weights are compared.
"""

from __future__ import annotations

import pytest
import torch

from profiles.errors import PolicyError
from profiles.packed import pack, read_packed
from profiles.policy import Policy, StorageSpec, apply_policy
from profiles.runtime import greedy_generate, measure_throughput, synthetic_prompt
from profiles.runtime.device_decode import decode_payload
from profiles.runtime.store import ExpertStore
from profiles.serving import ServingConfig
from tests.fixtures_models import model_cache

STEPS, PROMPT = 6, 5
# gate_up error-bounded on the GPU path, down int8 round-to-nearest (a host-side codec here)
MIXED = Policy(default=StorageSpec.parse("szp:meanabs:1"),
               matrices={(None, None, "down"): StorageSpec.parse("rtn8"),
                         (1, None, "gate_up"): StorageSpec.parse("lossless")})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory)


def _serving():
    return ServingConfig(gpu_mem_fraction=0.5, prompt_tokens=PROMPT, generated_tokens=STEPS)


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_runtime_logits_equal_the_in_memory_round_trip_bit_for_bit(models, arch, tmp_path):
    lm = models(arch)
    ids = synthetic_prompt(1, PROMPT, lm.geometry.vocab_size, seed=1)
    with apply_policy(lm, MIXED):
        ref = greedy_generate(lm.model, ids, STEPS, record_logits=True)
    ckpt = pack(lm, MIXED, tmp_path / "ckpt")
    for source, policy in ((lm, MIXED), (ckpt.path, None)):
        got = measure_throughput(source, policy, _serving(), prompt_ids=ids, record_logits=True,
                                 device="cpu")
        assert got.misses > 0
        assert got.output_ids == ref.ids.tolist()
        assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))
    # the uniform szp policy's logits differ: the matrices' codecs really changed what ran
    with apply_policy(lm, Policy(default=StorageSpec.parse("szp:meanabs:1"))):
        uniform = greedy_generate(lm.model, ids, STEPS, record_logits=True)
    assert not all(torch.equal(a, b) for a, b in zip(ref.logits, uniform.logits))


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "gpt_oss"])
def test_each_matrix_decodes_with_its_own_codec_to_the_round_trip_weights(models, arch,
                                                                          tmp_path):
    lm = models(arch)
    ckpt = read_packed(pack(lm, MIXED, tmp_path / "ckpt").path, verify=True)
    stores = [ExpertStore.from_loaded(lm, MIXED), ExpertStore.from_packed(ckpt)]
    with apply_policy(lm, MIXED):
        for ref in lm.expert_map.experts:
            want = {"gate_up": "lossless" if ref.layer == 1 else "szp", "down": "rtn8"}
            for store in stores:
                rec = store[(ref.layer, ref.expert)]
                assert rec.spec == ("gate_up=lossless,zstd_level=3;down=rtn8" if ref.layer == 1
                                    else f"gate_up={MIXED.default.describe()};down=rtn8")
                for t in rec.tensors:
                    kind = "down" if t.name.startswith("down") else "gate_up"
                    assert t.blob.codec == want[kind]   # biases go with their matrix
                    got = decode_payload(t.blob, None, torch.device("cpu"))
                    assert torch.equal(got.view(torch.uint8),
                                       ref.tensors[t.name].contiguous().view(torch.uint8))
    entry = next(e for e in ckpt.experts if e.layer == 1)
    assert entry.spec == "gate_up=lossless,zstd_level=3;down=rtn8"


def test_the_runtime_refuses_gate_on_a_fused_model_of_unknown_layout(models):
    import dataclasses

    lm = models("olmoe")
    lm = dataclasses.replace(lm, geometry=dataclasses.replace(lm.geometry, architecture="mystery"))
    ids = synthetic_prompt(1, PROMPT, lm.geometry.vocab_size, seed=1)
    policy = Policy(matrices={(None, None, "gate"): StorageSpec.parse("rtn8")})
    with pytest.raises(PolicyError, match="how a mystery model orders gate and up.*use 'gate_up'"):
        measure_throughput(lm, policy, _serving(), prompt_ids=ids, device="cpu")
