"""Per-matrix policies (issue 17): matrix kinds, the version-2 file format with `matrices`
overrides, version-1 files, refusals, and a real round trip that changes only the named matrix."""

from __future__ import annotations

import json

import pytest
import torch

from profiles.codecs import compressed_nbytes
from profiles.errors import PolicyError
from profiles.matrices import KINDS, matrix_of, model_kinds
from profiles.packed import encode_expert
from profiles.policy import Policy, StorageSpec, apply_policy
from tests.fixtures_models import model_cache

SZP = StorageSpec.parse("szp:meanabs:1")
RTN8 = StorageSpec.parse("rtn8")
LOSSLESS = StorageSpec.parse("lossless")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory)


@pytest.mark.parametrize("name, kind", [
    ("gate_up_proj", "gate_up"), ("gate_up_proj_bias", "gate_up"), ("down_proj", "down"),
    ("down_proj_bias", "down"), ("w1.weight", "gate"), ("w3.weight", "up"),
    ("w2.weight", "down"), ("gate_proj.weight", "gate"), ("up_proj.weight", "up"),
    ("down_proj.weight", "down")])
def test_matrix_kinds_of_fused_and_separate_tensor_names(name, kind):
    assert matrix_of(name) == kind


def test_an_unknown_tensor_has_no_matrix():
    with pytest.raises(PolicyError, match="belongs to no known matrix"):
        matrix_of("router.weight")


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_per_expert_and_fused_checkpoints_map_to_the_same_two_kinds(models, arch):
    # mixtral (w1/w2/w3) and olmoe/deepseek (gate/up/down_proj) are stored per expert on disk,
    # gpt_oss fused; all load as gate_up and down
    names = [n for n, _ in models(arch).geometry.expert_tensor_shapes]
    assert model_kinds(names) == ("gate_up", "down")


def test_most_specific_first():
    p = Policy(default=SZP, layers={1: RTN8}, experts={(1, 2): LOSSLESS},
               matrices={(None, None, "down"): RTN8, (1, None, "down"): LOSSLESS,
                         (1, 2, "gate_up"): SZP, (2, None, "gate_up"): LOSSLESS})
    assert p.spec_for(0, 0, "down") == RTN8 and p.spec_for(0, 0, "gate_up") == SZP
    assert p.spec_for(1, 0, "down") == LOSSLESS and p.spec_for(1, 0, "gate_up") == RTN8
    # the expert level's own spec comes before any layer-level matrix entry
    assert p.spec_for(1, 2, "down") == LOSSLESS and p.spec_for(1, 2, "gate_up") == SZP
    # a layer with only a matrix entry: its other matrix falls through to the default's
    assert p.spec_for(2, 0, "gate_up") == LOSSLESS and p.spec_for(2, 0, "down") == RTN8
    # gate and up fall back to gate_up unless named
    assert p.spec_for(2, 0, "gate") == LOSSLESS
    q = Policy(default=SZP, matrices={(None, None, "gate"): RTN8})
    assert q.spec_for(0, 0, "gate") == RTN8 and q.spec_for(0, 0, "up") == SZP
    # without a matrix, the expert-level spec as before
    assert p.spec_for(1, 2) == LOSSLESS and p.spec_for(0, 0) == SZP
    assert p.expert_specs(0, 0).describe() == f"gate_up={SZP.describe()};down=rtn8"
    assert Policy(default=SZP).expert_specs(0, 0).describe() == SZP.describe()


def test_version_2_file_round_trip(tmp_path):
    p = Policy(default=SZP, layers={1: RTN8},
               matrices={(None, None, "down"): RTN8, (2, None, "down"): LOSSLESS,
                         (1, 3, "gate_up"): LOSSLESS})
    p.save(tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["schema_version"] == 2
    assert doc["default"]["matrices"]["down"]["codec"] == "rtn8"
    assert doc["layers"]["2"] == {"matrices": {"down": LOSSLESS.to_dict()}}
    assert doc["experts"]["1:3"] == {"matrices": {"gate_up": LOSSLESS.to_dict()}}
    assert Policy.load(tmp_path / "p.json") == p


def test_version_1_file_reads_unchanged(tmp_path):
    v1 = {"kind": "policy", "schema_version": 1, "fingerprint": None,
          "default": SZP.to_dict(), "layers": {"1": RTN8.to_dict()},
          "experts": {"2:0": LOSSLESS.to_dict()}}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    p = Policy.load(tmp_path / "v1.json")
    assert p == Policy(default=SZP, layers={1: RTN8}, experts={(2, 0): LOSSLESS})
    assert not p.per_matrix
    for kind in KINDS:
        assert p.spec_for(1, 0, kind) == RTN8 and p.spec_for(2, 0, kind) == LOSSLESS


@pytest.mark.parametrize("doc, message", [
    ({"schema_version": 2, "default": {"codec": "raw", "matrices": {"ffn": {"codec": "rtn8"}}}},
     "unknown matrix 'ffn'; valid matrices: gate_up, down, gate, up"),
    ({"schema_version": 2, "layers": {"1": {"matrices": {"down_proj": {"codec": "rtn8"}}}}},
     "layer 1: unknown matrix 'down_proj'"),
    ({"schema_version": 1, "default": {"codec": "raw", "matrices": {"down": {"codec": "rtn8"}}}},
     "'matrices' needs schema_version 2"),
    ({"schema_version": 2, "default": {"codec": "raw", "matrices": {"down": {"codec": "szp"}}}},
     "matrix down.*needs a bound"),
    ({"schema_version": 2, "default": {"codec": "raw", "matrices": []}},
     "'matrices' must map matrix names"),
])
def test_bad_matrix_entries_are_refused_with_one_line(tmp_path, doc, message):
    (tmp_path / "p.json").write_text(json.dumps({"kind": "policy", **doc}))
    with pytest.raises(PolicyError, match=message) as info:
        Policy.load(tmp_path / "p.json")
    assert "\n" not in str(info.value)


def test_unknown_matrix_in_memory_is_refused():
    with pytest.raises(PolicyError, match="valid matrices: gate_up, down, gate, up"):
        Policy(matrices={(None, None, "mlp"): RTN8})


def test_gate_or_up_on_a_fused_model_of_unknown_layout_is_refused(models):
    # gate and up are split out of gate_up_proj where moesz knows the architecture's order
    # (tests/profiles/test_gate_up.py); elsewhere one line says to use gate_up
    import dataclasses

    lm = models("mixtral")
    lm = dataclasses.replace(lm, geometry=dataclasses.replace(lm.geometry, architecture="mystery"))
    with pytest.raises(PolicyError, match="how a mystery model orders gate and up.*use 'gate_up'"):
        with apply_policy(lm, Policy(matrices={(None, None, "gate"): RTN8})):
            pass


def test_matrix_entries_name_real_layers_and_experts(models):
    lm = models("deepseek_v3")   # layer 0 dense
    with pytest.raises(PolicyError, match="names layer 0"):
        with apply_policy(lm, Policy(matrices={(0, None, "down"): RTN8})):
            pass
    with pytest.raises(PolicyError, match="names expert 9 of layer 1"):
        with apply_policy(lm, Policy(matrices={(1, 9, "down"): RTN8})):
            pass


def test_only_the_named_matrix_changes(models):
    lm = models("olmoe")
    before = {(r.layer, r.expert): {n: t.clone() for n, t in r.tensors.items()}
              for r in lm.expert_map.experts}
    policy = Policy(matrices={(None, None, "down"): SZP})   # gate_up raw
    with apply_policy(lm, policy) as report:
        changed = {"gate_up_proj": 0, "down_proj": 0}
        for r in lm.expert_map.experts:
            for n, t in r.tensors.items():
                changed[n] += not torch.equal(t, before[(r.layer, r.expert)][n])
        assert changed["gate_up_proj"] == 0 and changed["down_proj"] == len(before)
        assert {e.spec for e in report.experts} == {f"gate_up=raw;down={SZP.describe()}"}
        # bytes: a raw blob of gate_up plus an szp blob of down, each measured on its own
        for e in report.experts:
            orig = before[(e.layer, e.expert)]
            assert e.stored_bytes == (
                compressed_nbytes(orig["gate_up_proj"], codec="raw")
                + compressed_nbytes(orig["down_proj"], codec="szp", mode="meanabs", level=1.0))
    for r in lm.expert_map.experts:
        for n, t in r.tensors.items():
            assert torch.equal(t, before[(r.layer, r.expert)][n])


def test_separate_gate_and_up_tensors_take_their_own_codec():
    # a model that keeps one module per expert (mixtral's w1/w2/w3 in memory): three blobs,
    # gate from `gate`, up from `gate_up`, down from `down`
    torch.manual_seed(0)
    tensors = {"w1.weight": torch.randn(24, 32, dtype=torch.bfloat16),
               "w2.weight": torch.randn(32, 24, dtype=torch.bfloat16),
               "w3.weight": torch.randn(24, 32, dtype=torch.bfloat16)}
    policy = Policy(default=LOSSLESS, matrices={(None, None, "gate"): RTN8,
                                                (None, None, "down"): SZP})
    enc = encode_expert(tensors, policy.expert_specs(0, 0), digests=False)
    assert [b.codec for b in enc.blobs] == ["rtn8", "szp", "lossless"]
