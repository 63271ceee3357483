"""`plan --per-matrix` (issue 17): a level per (layer, matrix) in the choice table, the MILP and
the search; the plan's policy packs and runs; a profile without per-matrix rows is refused.

The profile is a real one of the built-in model (two layers, two levels, 8 prompts per task):
enough to exercise every step, far too small to resolve a drop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from planner.choices import MatrixChoice
from planner.cli import app
from planner.milp import brute_force
from planner.pipeline import PlanRequest, make_plan
from profiles.errors import ProfileError
from profiles.models import load_model
from profiles.packed import pack
from profiles.policy import Policy, apply_policy
from profiles.profiling import ProfileRequest, profile_model
from profiles.runtime import greedy_generate, measure_throughput, synthetic_prompt
from profiles.serving import ServingConfig
from tests.planner.planner_fixtures import tiny_profile
from tests.profiles.test_profiling_model import _builtin_ready

pytestmark = pytest.mark.skipif(not _builtin_ready(), reason="the built-in model's weights are "
                                "not built")
SERVING = ServingConfig(gpu_mem_fraction=0.25, generated_tokens=64)


@pytest.fixture(scope="module")
def prof(tmp_path_factory):
    out = tmp_path_factory.mktemp("pm") / "prof"
    profile_model(ProfileRequest(model="builtin", out=out, codecs="szp", levels="1,2",
                                 layers="2,5", groups="none", limit=8, per_matrix=True,
                                 command="pytest"))
    return out


@pytest.fixture(scope="module")
def outcome(prof, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    return make_plan(PlanRequest(profile=str(prof), hardware="preset:h200-published",
                                 budget=0.3, serving=SERVING, trials=20, warm_trials=2, rerank=1,
                                 verify=0, per_matrix=True, command="pytest"), out=str(out))


def test_the_table_has_a_choice_per_pair_of_matrix_levels(outcome):
    t, acc = outcome.table, outcome.accuracy
    pairs = [(c, s) for c, s in enumerate(t.specs) if isinstance(s, MatrixChoice)]
    assert len(pairs) == 3 * 3 - 3          # raw, szp:1, szp:2 on each matrix, unequal pairs
    labels = t.labels
    for pos, layer in enumerate(t.moe_layers):
        if layer not in (2, 5):
            assert not t.available[pos, 1:].any()
            continue
        for c, s in pairs:
            # drop: the single-matrix drops added, variances added
            g = acc.matrix_models["gate_up"].effect(layer, s.gate_up.describe())
            d = acc.matrix_models["down"].effect(layer, s.down.describe())
            assert t.mu[pos, c] == pytest.approx(g[0] + d[0])
            assert t.var[pos, c] == pytest.approx(g[1] ** 2 + d[1] ** 2)
            # bytes: each matrix's stored bytes, added
            only_g = labels.index(MatrixChoice(s.gate_up, t.specs[0]).describe()
                                  if s.gate_up.codec != "raw" else "raw")
            only_d = labels.index(MatrixChoice(t.specs[0], s.down).describe()
                                  if s.down.codec != "raw" else "raw")
            assert t.stored_bytes[pos, c] == pytest.approx(
                t.stored_bytes[pos, only_g] + t.stored_bytes[pos, only_d]
                - t.stored_bytes[pos, 0])
        # the down-only and gate_up-only points are not the whole-expert point
        whole = t.mu[pos, labels.index("szp:meanabs:2,variant=fixed")]
        assert t.stored_bytes[pos, labels.index(
            "gate_up=raw;down=szp:meanabs:2,variant=fixed")] > t.stored_bytes[
                pos, labels.index("szp:meanabs:2,variant=fixed")]
        assert np.isfinite(whole)


def test_the_milp_is_the_brute_force_optimum_over_matrix_pairs(outcome):
    t = outcome.table
    # only layers 2 and 5 have choices besides raw: enumerate their 9 x 9 pairs
    rows = [i for i, layer in enumerate(t.moe_layers) if layer in (2, 5)]
    rest = [i for i in range(len(t.moe_layers)) if i not in rows]
    ref = brute_force(np.where(t.available, t.layer_s, np.inf)[rows], np.nan_to_num(t.mu)[rows],
                      np.nan_to_num(t.var)[rows], outcome.accuracy.constraint(0.3))
    assert outcome.milp.cost == pytest.approx(ref[0] + t.layer_s[rest, 0].sum(), rel=1e-9)


def test_a_per_matrix_plan_packs_and_runs(outcome, tmp_path):
    t = outcome.table
    pos = {layer: i for i, layer in enumerate(t.moe_layers)}
    choice = np.zeros(len(t.moe_layers), int)
    choice[pos[2]] = t.labels.index("gate_up=szp:meanabs:2,variant=fixed;down=raw")
    choice[pos[5]] = t.labels.index("gate_up=szp:meanabs:1,variant=fixed;"
                                    "down=szp:meanabs:2,variant=fixed")
    policy = t.policy(choice, outcome.profile.fingerprint)
    assert policy.per_matrix and policy.spec_for(2, 0, "down").codec == "raw"
    lm = load_model("builtin")
    ids = synthetic_prompt(1, 5, lm.geometry.vocab_size, seed=1)
    with apply_policy(lm, policy):
        ref = greedy_generate(lm.model, ids, 4, record_logits=True)
    ckpt = pack(lm, policy, tmp_path / "ck")
    got = measure_throughput(ckpt.path, None, ServingConfig(gpu_mem_fraction=0.5, prompt_tokens=5,
                                                            generated_tokens=4),
                             prompt_ids=ids, record_logits=True, device="cpu")
    assert got.output_ids == ref.ids.tolist()
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=0)
    assert Policy.from_dict(ckpt.manifest["policy"]).expert_specs(5, 0) == \
        policy.expert_specs(5, 0)


def test_per_matrix_on_a_profile_without_per_matrix_rows_is_refused(tmp_path):
    plain = tiny_profile(tmp_path / "plain")
    with pytest.raises(ProfileError, match="no per-matrix rows.*--per-matrix"):
        make_plan(PlanRequest(profile=str(plain), hardware="preset:h200-published", budget=0.01,
                              serving=SERVING, trials=5, warm_trials=0, verify=0,
                              per_matrix=True))
    r = CliRunner().invoke(app, ["plan", "--profile", str(plain), "--hardware",
                                 "preset:h200-published", "--accuracy-budget", "0.01",
                                 "--gpu-mem", "25%", "--per-matrix", "--out",
                                 str(tmp_path / "p.json")])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "--per-matrix" in lines[0] and "Traceback" not in r.output
