"""Policies: specs, serialization, fit checks, and applying them with real codecs or surrogates."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from profiles.errors import PolicyError
from profiles.models import load_model
from profiles.policy import Policy, StorageSpec, apply_policy
from tests.fixtures_models import EXPERTS, save_tiny_fp8_model, save_tiny_model

IDS = torch.arange(3, 27).reshape(2, 12)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """A bf16 deepseek_v3 checkpoint: layer 0 dense, MoE layers 1-2, shared experts."""
    path = save_tiny_model("deepseek_v3", tmp_path_factory.mktemp("p") / "ds", seed=3)
    return load_model(str(path))


@pytest.fixture(scope="module")
def mx32(tmp_path_factory):
    """An fp32 mixtral checkpoint (noise statistics without bf16 rounding)."""
    path = save_tiny_model("mixtral", tmp_path_factory.mktemp("p") / "mx", seed=4,
                           dtype=torch.float32)
    return load_model(str(path))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bit_identical(model, snap) -> bool:
    return all(torch.equal(v.view(torch.uint8), snap[k].view(torch.uint8))
               for k, v in model.state_dict().items())


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(IDS).logits.clone()


def _diffs(loaded, snap, layers=None):
    """perturbed - original of every routed expert tensor, as fp64."""
    out = []
    for ref in loaded.expert_map.experts:
        if layers is None or ref.layer in layers:
            block = loaded.expert_map.block_names[ref.layer]
            for name, t in ref.tensors.items():
                orig = snap[f"{block}.experts.{name}"][ref.expert]
                out.append((t.double() - orig.double()).reshape(-1))
    return torch.cat(out)


# --- specs ----------------------------------------------------------------------------------

def test_storage_spec_parse_and_normalize():
    s = StorageSpec.parse("szp:meanabs:0.5")
    assert (s.codec, s.mode, s.level, s.error_bounded) == ("szp", "meanabs", 0.5, True)
    assert StorageSpec.parse("lossless").mode is None
    assert StorageSpec.parse("raw:abs:1").describe() == "raw"  # raw ignores the bound
    lorenzo = StorageSpec.parse("sz3:abs:1e-3,predictor=lorenzo")
    assert lorenzo.codec_options["predictor"] == "lorenzo"
    assert hash(StorageSpec.parse("szp:abs:1e-3")) == hash(StorageSpec("szp", "abs", 0.001))


@pytest.mark.parametrize("text, message", [
    ("nope:abs:1", "codec 'nope' is unknown"),
    ("szp", "needs a bound"),
    ("szp:abs:-1", "must be a finite number > 0"),
    ("szp:abs:nan", "must be a finite number > 0"),
    ("szp:sideways:1", "bound mode 'sideways' is unknown"),
    ("szp:abs", "is not CODEC or CODEC:MODE:LEVEL"),
    ("sz3:abs:1e-3,speed=11", "unknown option"),
])
def test_bad_storage_specs(text, message):
    with pytest.raises(PolicyError, match=message):
        StorageSpec.parse(text)


def test_precedence_and_json_round_trip(tmp_path):
    p = Policy(fingerprint="fp2:abc", default=StorageSpec.parse("szp:meanabs:0.5"),
               layers={2: StorageSpec.parse("lossless")},
               experts={(2, 1): StorageSpec.parse("sz3:abs:1e-3,predictor=interp")})
    assert p.spec_for(1, 0).codec == "szp" and p.spec_for(2, 0).codec == "lossless"
    assert p.spec_for(2, 1).codec_options == {"predictor": "interp"}
    assert Policy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    p.save(tmp_path / "policy.json")
    doc = json.loads((tmp_path / "policy.json").read_text())
    assert doc["kind"] == "policy" and doc["schema_version"] == 2 and "2:1" in doc["experts"]
    assert Policy.load(tmp_path / "policy.json") == p
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.fingerprint = None


def test_load_accepts_a_plan_file_holding_a_policy(tmp_path):
    p = Policy.uniform("szp", "meanabs", 0.3, fingerprint="fp2:0123")
    plan = {"kind": "plan", "schema_version": 1, "predicted": {}, "policy": p.to_dict()}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert Policy.load(tmp_path / "plan.json") == p
    # a plan of another schema version, or another kind of document, is refused
    for doc, message in (({**plan, "schema_version": 7}, "'schema_version' is 7, expected 1"),
                         ({**plan, "kind": "sweep"}, "field 'kind' is 'sweep'")):
        (tmp_path / "other.json").write_text(json.dumps(doc))
        with pytest.raises(PolicyError, match=message):
            Policy.load(tmp_path / "other.json")


@pytest.mark.parametrize("content, message", [
    (None, "no such policy or plan file"),
    ("{not json", "not valid JSON"),
    ('{"kind": "hardware_profile"}', "neither a policy"),
    ('{"kind": "policy", "schema_version": 99}', "schema_version is 99, expected 1 or 2"),
    ('{"kind": "policy", "schema_version": 1, "layers": {"x": {"codec": "raw"}}}', "integers"),
    ('{"kind": "policy", "schema_version": 1, "default": {"codec": "raw", "lvl": 1}}',
     "unknown field"),
])
def test_unreadable_policy_files(tmp_path, content, message):
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


# --- fit checks -----------------------------------------------------------------------------

def test_policy_for_another_model_is_refused(ds):
    other = Policy.uniform("lossless", fingerprint="fp2:0000000000000000")
    with pytest.raises(PolicyError, match="made for model fingerprint fp2:0000.*this model's is"):
        with apply_policy(ds, other):
            pass
    with apply_policy(ds, Policy.uniform("lossless", fingerprint=ds.fingerprint)):
        pass


def test_policy_naming_a_missing_layer_or_expert_is_refused(ds):
    dense = Policy(layers={0: StorageSpec.parse("lossless")})  # layer 0 is dense
    with pytest.raises(PolicyError, match=r"layer 0, which is not an MoE layer.*MoE layers: 1-2"):
        with apply_policy(ds, dense):
            pass
    with pytest.raises(PolicyError, match="layer 7"):
        with apply_policy(ds, Policy(experts={(7, 0): StorageSpec()})):
            pass
    with pytest.raises(PolicyError, match=f"expert {EXPERTS} of layer 1.*experts 0-3"):
        with apply_policy(ds, Policy(experts={(1, EXPERTS): StorageSpec()})):
            pass


def test_unknown_surrogates_are_refused(ds):
    with pytest.raises(PolicyError, match="surrogate 'laplace' is unknown"):
        with apply_policy(ds, Policy.uniform("szp", "abs", 1e-3), surrogate="laplace"):
            pass


# --- real round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("policy", [Policy.none(), Policy.uniform("lossless")],
                         ids=["raw", "lossless"])
def test_exact_round_trip_leaves_logits_bit_identical(ds, policy):
    base = _logits(ds)
    with apply_policy(ds, policy) as report:
        assert torch.equal(_logits(ds), base)
    assert report.restore_bytes < 100 * len(report.experts)  # all-zero residuals
    assert torch.equal(_logits(ds), base)


def test_lossy_policy_perturbs_then_restores_exactly(ds):
    snap, base = _snapshot(ds.model), _logits(ds)
    calls = []
    policy = Policy.uniform("szp", "meanabs", 0.5, fingerprint=ds.fingerprint)
    with apply_policy(ds, policy, progress=lambda d, t, label: calls.append((d, t))) as report:
        assert not torch.equal(_logits(ds), base)
        d = _diffs(ds, snap)
        assert d.abs().max() > 0
    assert _bit_identical(ds.model, snap) and torch.equal(_logits(ds), base)
    n = 2 * EXPERTS
    assert len(report.experts) == n and calls[-1] == (n, n) and len(calls) == n
    assert report.original_bytes == n * ds.geometry.bytes_per_expert
    assert report.stored_bytes == sum(e.stored_bytes for e in report.experts)
    assert all(e.spec == "szp:meanabs:0.5,variant=fixed" and e.abs_bound > 0
               for e in report.experts)
    # the undo data is far smaller than a copy of the perturbed experts
    assert report.restore_bytes < report.original_bytes


def test_reported_bytes_are_the_codec_blob_sizes(ds):
    from profiles.codecs import encode

    ref = ds.expert_map.get(2, 3)
    want = sum(encode(t, codec="szp", mode="abs", level=1e-3).nbytes for t in ref.tensors.values())
    with apply_policy(ds, Policy.uniform("szp", "abs", 1e-3)) as report:
        row = next(e for e in report.experts if (e.layer, e.expert) == (2, 3))
    assert row.stored_bytes == want and row.original_bytes == ds.geometry.bytes_per_expert


def test_restored_after_an_error_inside_the_context(ds):
    snap = _snapshot(ds.model)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_policy(ds, Policy.uniform("szp", "abs", 1e-2)):
            raise RuntimeError("boom")
    assert _bit_identical(ds.model, snap)


def test_layer_override_touches_only_that_layer(ds):
    snap = _snapshot(ds.model)
    policy = Policy(layers={2: StorageSpec.parse("szp:meanabs:0.8")})
    with apply_policy(ds, policy):
        assert _diffs(ds, snap, layers={1}).abs().max() == 0
        assert _diffs(ds, snap, layers={2}).abs().max() > 0
        for layer, tensors in ds.expert_map.shared_experts.items():  # not routed: untouched
            for name, t in tensors.items():
                assert torch.equal(t, snap[f"{ds.expert_map.block_names[layer]}.{name}"])
    assert _bit_identical(ds.model, snap)


def test_bound_is_respected_inside_the_model(mx32):
    snap = _snapshot(mx32.model)
    with apply_policy(mx32, Policy.uniform("szp", "abs", 1e-3)) as report:
        d = _diffs(mx32, snap)
    bound = max(e.abs_bound for e in report.experts)
    assert 0 < d.abs().max() <= bound * (1 + 2**-20)


def test_fp8_ratios_count_fp8_bytes(tmp_path):
    loaded = load_model(str(save_tiny_fp8_model(tmp_path / "fp8", block=8)))
    with apply_policy(loaded, Policy.uniform("lossless")) as report:
        pass
    assert {e.original_bytes for e in report.experts} == {48 * 32 + 32 * 24 + 4 * 36}
    assert report.ratio == report.original_bytes / report.stored_bytes


# --- surrogates -------------------------------------------------------------------------------

def test_gaussian_surrogate_statistics(mx32):
    snap, e = _snapshot(mx32.model), 1e-2
    with apply_policy(mx32, Policy.uniform("szp", "abs", e), surrogate="gaussian") as report:
        d = _diffs(mx32, snap)
    n = d.numel()
    assert abs(float(d.mean())) < 4 * e / math.sqrt(n)
    assert float(d.std()) == pytest.approx(e, rel=0.03)
    # a third of N(0, e) draws exceed e (2 * (1 - Phi(1)) = 0.3173)
    assert float((d.abs() > e).double().mean()) == pytest.approx(0.3173, abs=0.015)
    assert report.surrogate == "gaussian" and report.stored_bytes is not None
    # e is the codec's own bound: the request rounded down to fp32
    assert all(r.abs_bound == pytest.approx(e, rel=1e-7) and r.abs_bound <= e
               for r in report.experts)
    assert _bit_identical(mx32.model, snap)


def test_uniform_surrogate_statistics(mx32):
    snap, e = _snapshot(mx32.model), 1e-2
    with apply_policy(mx32, Policy.uniform("szp", "abs", e), surrogate="uniform",
                      measure_bytes=False) as report:
        d = _diffs(mx32, snap)
    assert float(d.abs().max()) <= e * (1 + 1e-6)
    assert float(d.std()) == pytest.approx(e / math.sqrt(3), rel=0.03)
    assert abs(float(d.mean())) < 4 * e / math.sqrt(3 * d.numel())
    assert report.stored_bytes is None  # not measured


def test_surrogate_bound_follows_the_mode(mx32):
    """meanabs: e = p x mean |w| of each tensor (the study's definition)."""
    snap, p = _snapshot(mx32.model), 0.5
    ratios = []
    with apply_policy(mx32, Policy.uniform("szp", "meanabs", p), surrogate="gaussian"):
        for ref in mx32.expert_map.experts:
            block = mx32.expert_map.block_names[ref.layer]
            for name, t in ref.tensors.items():
                orig = snap[f"{block}.experts.{name}"][ref.expert].double()
                ratios.append(float((t.double() - orig).std() / (p * orig.abs().mean())))
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, rel=0.02)


def test_surrogate_is_deterministic_under_a_seed(mx32):
    snap = _snapshot(mx32.model)
    policy = Policy.uniform("szp", "abs", 1e-2)
    runs = []
    for seed in (0, 0, 1):
        with apply_policy(mx32, policy, surrogate="gaussian", seed=seed, measure_bytes=False):
            runs.append(_diffs(mx32, snap))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    real = []
    for seed in (0, 1):  # real codecs are deterministic and ignore the seed
        with apply_policy(mx32, policy, seed=seed):
            real.append(_diffs(mx32, snap))
    assert torch.equal(real[0], real[1])


@pytest.mark.gpu
def test_policy_on_a_cuda_model_restores_exactly(tmp_path):
    path = save_tiny_model("qwen3_moe", tmp_path / "q", seed=5)
    loaded = load_model(str(path), device="cuda")
    snap, ids = _snapshot(loaded.model), IDS.cuda()
    with torch.no_grad():
        base = loaded.model(ids).logits.clone()
    for surrogate in (None, "uniform"):
        with apply_policy(loaded, Policy.uniform("szp", "meanabs", 0.5), surrogate=surrogate):
            with torch.no_grad():
                assert not torch.equal(loaded.model(ids).logits, base)
        assert _bit_identical(loaded.model, snap)
