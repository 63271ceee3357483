"""`plan --per-matrix` on a profile that perturbed gate and up apart (issue 17): a level per
(layer, gate / up / down), the plan's policy splits gate_up_proj and runs, and the report's
summary line says which matrices the plan protects, derived from its policy."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from planner.choices import MatrixChoice
from planner.cli import app
from planner.pipeline import PlanRequest, make_plan
from planner.protection import matrix_summary, tighter
from profiles.errors import ProfileError
from profiles.models import load_model
from profiles.packed import pack
from profiles.policy import Policy, StorageSpec, apply_policy
from profiles.profiling import ProfileRequest, profile_model
from profiles.runtime import greedy_generate, measure_throughput, synthetic_prompt
from profiles.serving import ServingConfig
from tests.profiles.test_profiling_model import _builtin_ready

SERVING = ServingConfig(gpu_mem_fraction=0.25, generated_tokens=64)
SZP1, SZP2 = StorageSpec.parse("szp:meanabs:1"), StorageSpec.parse("szp:meanabs:2")
RAW = StorageSpec()
needs_builtin = pytest.mark.skipif(not _builtin_ready(), reason="the built-in model's weights "
                                   "are not built")


@pytest.fixture(scope="module")
def prof(tmp_path_factory):
    out = tmp_path_factory.mktemp("gu") / "prof"
    profile_model(ProfileRequest(model="builtin", out=out, codecs="szp", levels="1,2",
                                 layers="2,5", groups="none", limit=8, matrices="gate,up,down",
                                 command="pytest"))
    return out


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    return tmp_path_factory.mktemp("plan") / "plan.json"


@pytest.fixture(scope="module")
def outcome(prof, plan_path):
    out = plan_path
    return make_plan(PlanRequest(profile=str(prof), hardware="preset:h200-published",
                                 budget=0.3, serving=SERVING, trials=20, warm_trials=2, rerank=1,
                                 verify=0, per_matrix=True, command="pytest"), out=str(out))


@needs_builtin
def test_the_table_has_a_choice_per_gate_up_down_combination(outcome):
    t, acc = outcome.table, outcome.accuracy
    assert acc.matrix_kinds == ("gate", "up", "down")
    triples = [(c, s) for c, s in enumerate(t.specs) if isinstance(s, MatrixChoice)]
    assert len(triples) == 3 ** 3 - 3      # raw, szp:1, szp:2 on each matrix, not all equal
    assert all(s.kinds == ("gate", "up", "down") for _, s in triples)
    pos = t.moe_layers.index(5)
    for c, s in triples:
        parts = [(k, getattr(s, k)) for k in s.kinds if getattr(s, k).codec != "raw"]
        effects = [acc.matrix_models[k].effect(5, spec.describe()) for k, spec in parts]
        assert t.mu[pos, c] == pytest.approx(sum(e[0] for e in effects))
        assert t.var[pos, c] == pytest.approx(sum(e[1] ** 2 for e in effects))
    # gate stored apart costs bytes of its own: gate raw, up and down at szp:2 stores more than
    # the whole expert at szp:2
    label = "gate=raw;up={0};down={0}".format(SZP2.describe())
    assert t.stored_bytes[pos, t.labels.index(label)] > \
        t.stored_bytes[pos, t.labels.index(SZP2.describe())]


@needs_builtin
def test_a_gate_up_down_plan_packs_and_runs_as_it_round_trips(outcome, tmp_path):
    t = outcome.table
    choice = np.zeros(len(t.moe_layers), int)
    choice[t.moe_layers.index(2)] = t.labels.index(
        "gate={0};up={1};down=raw".format(SZP2.describe(), SZP1.describe()))
    policy = t.policy(choice, outcome.profile.fingerprint)
    specs = policy.expert_specs(2, 0)
    assert (specs.gate, specs.up, specs.down) == (SZP2, SZP1, RAW)
    lm = load_model("builtin")
    ids = synthetic_prompt(1, 5, lm.geometry.vocab_size, seed=1)
    with apply_policy(lm, policy):
        ref = greedy_generate(lm.model, ids, 4, record_logits=True)
    ckpt = pack(lm, policy, tmp_path / "ck")
    entry = next(e for e in ckpt.experts if e.layer == 2)
    assert [b.name for b in entry.blobs] == ["gate_proj", "up_proj", "down_proj"]
    got = measure_throughput(ckpt.path, None, ServingConfig(gpu_mem_fraction=0.5, prompt_tokens=5,
                                                            generated_tokens=4),
                             prompt_ids=ids, record_logits=True, device="cpu")
    assert got.output_ids == ref.ids.tolist()


@needs_builtin
def test_plan_show_says_which_matrices_the_plan_protects(outcome, plan_path):
    doc = outcome.plan.doc
    policy = Policy.from_dict(doc["policy"])
    line = matrix_summary(policy, [x["layer"] for x in doc["layers"]])
    assert doc["matrices"] == {"kinds": ["gate", "up", "down"], "summary": line}
    r = CliRunner().invoke(app, ["plan", "show", str(plan_path)])
    assert r.exit_code == 0, r.output
    assert "".join(line.split()) in "".join(r.output.split())   # wherever rich wraps it


@needs_builtin
def test_gate_and_up_at_one_level_sum_their_rows_where_the_gate_up_row_is_missing(prof):
    # a profile with gate_up-only rows at layer 2 alone (e.g. an earlier run with --matrices
    # gate_up,down --layers 2): at layer 5, gate and up at one level are the sum of their own
    # rows, as at a layer without gate_up rows, not an unprofiled choice
    import pandas as pd

    from planner.accuracy import AccuracyModel
    from profiles.profiling import read_profile

    s = read_profile(prof).sensitivity
    gu = s[(s.matrix == "gate") & (s.target == "layer:2")].assign(matrix="gate_up")
    sens = pd.concat([s, gu], ignore_index=True)
    acc = AccuracyModel(sens)
    acc.attach_matrices(sens)
    assert acc.matrix_kinds == ("gate", "up", "down") and "gate_up" in acc.matrix_models
    lab = SZP1.describe()
    both = f"gate={lab};up={lab};down=raw"
    g, u = (acc.matrix_models[k].effect(5, lab) for k in ("gate", "up"))
    assert acc.effect(5, both) == pytest.approx((g[0] + u[0], (g[1] ** 2 + u[1] ** 2) ** 0.5))
    assert acc.effect(2, both) == pytest.approx(acc.matrix_models["gate_up"].effect(2, lab))


@needs_builtin
def test_a_profile_with_gate_and_up_but_no_down_points_is_refused(tmp_path):
    out = tmp_path / "p"
    profile_model(ProfileRequest(model="builtin", out=out, codecs="szp", levels="2",
                                 layers="2", groups="none", limit=8, matrices="gate,up",
                                 command="pytest"))
    with pytest.raises(ProfileError, match=r"no per-matrix rows for down; profile with "
                                           r"`moesz profile model --per-matrix --matrices "
                                           r"gate,up,down`"):
        make_plan(PlanRequest(profile=str(out), hardware="preset:h200-published", budget=0.3,
                              serving=SERVING, trials=5, warm_trials=0, verify=0,
                              per_matrix=True))


def test_the_summary_names_protected_matrices_and_how_the_rest_is_stored():
    p = Policy(layers={x: SZP2 for x in range(8)}, matrices={(2, None, "down"): RAW,
                                                             (5, None, "down"): RAW})
    assert matrix_summary(p, range(8)) == (
        "protects: down on layers 2, 5 (raw); compresses gate_up everywhere at "
        f"{SZP2.describe()}; compresses down on layers 0-1, 3-4, 6-7 at {SZP2.describe()}")
    q = Policy(layers={x: SZP2 for x in range(4)}, matrices={(1, None, "up"): SZP1})
    assert matrix_summary(q, range(4)) == (
        f"protects: up on layer 1 ({SZP1.describe()}); compresses gate everywhere at "
        f"{SZP2.describe()}; compresses up on layers 0, 2-3 at {SZP2.describe()}; compresses "
        f"down everywhere at {SZP2.describe()}")
    assert matrix_summary(Policy(default=SZP2), range(2)).startswith(
        "protects: no matrix (each layer stores its matrices alike); compresses gate_up "
        "everywhere")


def test_a_summary_without_a_protected_matrix_says_why_when_matrices_differ():
    # rtn8 beside szp, or raw beside lossless, cannot be ranked: nothing is protected, but the
    # layers do not store their matrices alike
    rtn8, lossless = StorageSpec.parse("rtn8"), StorageSpec.parse("lossless")
    mixed = Policy(layers={0: rtn8, 1: rtn8}, matrices={(0, None, "down"): SZP2,
                                                         (1, None, "down"): SZP2})
    exact = Policy(layers={0: RAW, 1: RAW}, matrices={(0, None, "down"): lossless})
    for p in (mixed, exact):
        head = matrix_summary(p, range(2)).split(";")[0]
        assert head == ("protects: no matrix (where a layer's matrices differ, their specs "
                        "cannot be ranked: different lossy codecs, or raw beside lossless)")
    assert matrix_summary(Policy(), range(2)).startswith(
        "protects: no matrix (each layer stores its matrices alike); keeps gate_up raw")


def test_only_comparable_specs_rank():
    assert tighter(RAW, SZP2) and tighter(StorageSpec.parse("lossless"), SZP1)
    assert tighter(SZP1, SZP2) and not tighter(SZP2, SZP1)
    assert not tighter(StorageSpec.parse("rtn8"), SZP2) and not tighter(SZP2,
                                                                        StorageSpec.parse("rtn8"))
    assert not tighter(RAW, StorageSpec.parse("lossless"))


@needs_builtin
def test_a_second_budget_keeps_the_per_matrix_choices(prof):
    """A further budget answers per-matrix choices too: the per-matrix options keep their
    predicted drop of it instead of all being filtered out (the plan then fell back to raw)."""
    from planner.budget import make_budget, predicted_drop
    from planner.modelprofile import load_profile

    p = load_profile(str(prof))
    label = "gate=szp:meanabs:1,variant=fixed;up=szp:meanabs:2,variant=fixed;" \
            "down=szp:meanabs:2,variant=fixed"

    class Option:                       # the fields predicted_drop reads
        layers = [{"layer": 2, "spec": label}, {"layer": 5, "spec": label}]

    assert predicted_drop(make_budget("content", 0.5, p, 1.96, per_matrix=True),
                          Option()) is not None
    assert predicted_drop(make_budget("content", 0.5, p, 1.96), Option()) is None
