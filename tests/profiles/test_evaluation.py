"""Generation, evaluation, paired comparison, fidelity and user benchmarks on tiny real models."""

from __future__ import annotations

import json

import pytest
import torch

from profiles.errors import MoeszError
from profiles.evaluation import (EvalResult, UserBenchmark, base_distributions,
                                 builtin_calibration, cached_baseline, evaluate, fidelity,
                                 greedy_generate, perplexity, run_lm_eval)
from profiles.evaluation.fidelity import calibration_from_texts
from profiles.evaluation.userbench import contains_answer, reference_answer
from profiles.models import load_model
from profiles.policy import Policy, apply_policy
from profiles.tasks import CharTokenizer
from tests.fixtures_models import tiny_model
from tests.profiles.eval_helpers import one_torch_thread, save_tiny_checkpoint  # noqa: F401

PROMPTS = ["347+589=", "12+3=", "S583920=", "1=", "R5839201="]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny qwen3_moe checkpoint with a Hugging Face character tokenizer, loaded."""
    return load_model(str(save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("q") / "m")))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_batched_greedy_equals_unpadded_generate(arch):
    """Left padding, position ids and the KV cache do not change what a row generates."""
    tok = CharTokenizer()
    model = tiny_model(arch, vocab_size=tok.vocab_size)
    gens = greedy_generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    for prompt, gen in zip(PROMPTS, gens):
        ids = torch.tensor([tok.encode(prompt)])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert list(gen.token_ids) == [t for t in ref if t != tok.eos_token_id][:len(gen.token_ids)]
        assert gen.end == ("eos" if tok.eos_token_id in ref else "length")
        assert gen.prompt_tokens == len(prompt) + 1  # BOS


def test_generation_stops_when_every_row_has_ended():
    tok = CharTokenizer()
    model = tiny_model("qwen3_moe", vocab_size=tok.vocab_size)
    handle = model.lm_head.register_forward_hook(
        lambda m, a, out: out.index_fill(-1, torch.tensor([tok.eos_token_id]), 1e4))
    phases = []
    try:
        gens = greedy_generate(model, tok, PROMPTS, max_new_tokens=20,
                               on_forward=lambda phase, real, pos: phases.append(phase))
    finally:
        handle.remove()
    assert phases == ["prefill"]  # every row emitted EOS first: no decode step ran
    assert all(g.text == "" and g.end == "eos" and g.fed_tokens == 0 for g in gens)


def test_generation_rejects_empty_input():
    with pytest.raises(MoeszError, match="no prompts"):
        greedy_generate(tiny_model("qwen3_moe"), CharTokenizer(), [], 4)


def test_evaluate_with_a_hugging_face_tokenizer_is_deterministic(tiny):
    seen = []
    a = evaluate(tiny, tasks=["add", "sort"], split="validate", limit=5,
                 progress=lambda d, t, label: seen.append((d, t)))
    b = evaluate(tiny, tasks=["add", "sort"], split="validate", limit=5, batch_size=2)
    assert [t.task for t in a.tasks] == ["add", "sort"] and seen[-1] == (10, 10)
    for ta, tb in zip(a.tasks, b.tasks):
        assert ta.generations == tb.generations and ta.n == 5
        assert ta.strict.method.startswith("wilson") and 0 <= ta.content.low <= ta.content.high
        assert all(c or not s for s, c in zip(ta.strict_correct, ta.content_correct))
    with pytest.raises(AttributeError):
        a.split = "profile"  # frozen


def test_the_same_model_against_itself_shows_no_change(tiny):
    base = evaluate(tiny, tasks=["add"], limit=6)
    again = evaluate(tiny, tasks=["add"], limit=6, baseline=base, condition="again")
    c = again.task("add").content_change
    assert (c.gained, c.lost, c.mcnemar_p, c.change.value) == (0, 0, 1.0, 0.0)
    assert again.verdicts() == {"add": ("no significant change", 1.0)}


def test_a_perturbed_model_is_paired_with_its_baseline(tiny):
    base = evaluate(tiny, tasks=["add", "sub"], limit=8)
    with apply_policy(tiny, Policy.uniform("szp", "meanabs", 4.0)):
        pert = evaluate(tiny, tasks=["add", "sub"], limit=8, baseline=base, condition="szp")
    for t in pert.tasks:
        b, c = base.task(t.task), t.content_change
        assert c.change.value == pytest.approx(t.content.value - b.content.value)
        assert c.both + c.gained == sum(t.content_correct)
        assert c.both + c.lost == sum(b.content_correct)
    # the perturbation really changed the model's output somewhere
    assert any(t.generations != base.task(t.task).generations for t in pert.tasks)


def test_a_baseline_on_other_prompts_is_refused(tiny):
    base = evaluate(tiny, tasks=["add"], limit=4, split="profile")
    with pytest.raises(MoeszError, match="other prompts"):
        evaluate(tiny, tasks=["add"], limit=4, split="validate", baseline=base)


def test_results_round_trip_and_the_baseline_cache_is_reused(tiny, tmp_path):
    path = tmp_path / "base.json"
    first = cached_baseline(tiny, path, ["add", "sort"], "profile", 4)
    stamp = path.stat().st_mtime_ns
    again = cached_baseline(tiny, path, ["sort"], "profile", 4)
    assert path.stat().st_mtime_ns == stamp  # read from disk, not evaluated again
    assert again.tasks == (first.task("sort"),)
    assert EvalResult.load(path) == first
    assert json.loads(path.read_text())["kind"] == "eval_result"
    other = cached_baseline(tiny, path, ["add"], "profile", 5)  # another limit: re-evaluated
    assert other.task("add").n == 5


def test_fidelity_is_zero_against_itself_and_positive_when_perturbed(tiny):
    calib = builtin_calibration(tiny.model, tiny.tokenizer, per_task=4)
    base = base_distributions(tiny.model, calib)
    same = fidelity(tiny.model, base)
    assert same.mean_kl_nats == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.sequences == 16 and same.positions == int(calib.attention_mask.sum())
    with apply_policy(tiny, Policy.uniform("szp", "meanabs", 4.0)):
        moved = fidelity(tiny.model, base)
        with torch.no_grad():
            logits = tiny.model(input_ids=calib.input_ids,
                                attention_mask=calib.attention_mask).logits.float()
    mask = calib.attention_mask.bool()
    ref = torch.nn.functional.kl_div(logits.log_softmax(-1)[mask], base.log_probs,
                                     log_target=True, reduction="batchmean")
    assert moved.mean_kl_nats > 0 and moved.mean_kl_nats == pytest.approx(float(ref), rel=1e-4)


def test_perplexity_equals_exp_of_the_mean_negative_log_likelihood(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("12+34=[64] 5-3=[2]")
    res = perplexity(tiny.model, tiny.tokenizer, text, context_tokens=64)
    ids = torch.tensor([tiny.tokenizer(text.read_text())["input_ids"]])
    with torch.no_grad():
        lp = tiny.model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
    nll = -lp.gather(-1, ids[0, 1:, None]).mean()
    assert res.tokens == ids.shape[1] - 1 and res.windows == 1
    assert res.perplexity == pytest.approx(float(nll.exp()), rel=1e-5)
    short = perplexity(tiny.model, tiny.tokenizer, text, context_tokens=8)
    assert short.windows == 3 and short.tokens == res.tokens
    with pytest.raises(MoeszError, match="no such text file"):
        perplexity(tiny.model, tiny.tokenizer, tmp_path / "missing.txt")


def test_gsm8k_style_answers_and_scoring(tmp_path):
    assert reference_answer("She has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert reference_answer("42.0") == "42" and reference_answer(" $5. ") == "5"
    assert contains_answer("so 1,234 in total", "1234") and not contains_answer("12345", "1234")
    path = tmp_path / "bench.jsonl"
    path.write_text('{"question": "2+2", "answer": "2+2=4\\n#### 4"}\n\n'
                    '{"question": "3+4", "answer": 7}\n')
    bench = UserBenchmark(str(path), template="{question}=")
    exs = bench.examples()
    assert [e.prompt for e in exs] == ["2+2=", "3+4="] and [e.content for e in exs] == ["4", "7"]
    assert bench.score(exs[0], "the sum is 4 #### 4") == (True, True)
    assert bench.score(exs[0], "the sum is 4") == (False, True)
    assert bench.score(exs[0], "#### 5") == (False, False)
    assert bench.name == "bench" and len(bench.examples(limit=1)) == 1


def test_user_benchmark_runs_through_evaluate(tiny, tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in [("1+2", "3"), ("4+4", "8"), ("9-3", "6")]))
    bench = UserBenchmark(str(path), template="{question}=", extract=r"\[(\d+)\]",
                          max_new_tokens=5, stop=("]",))
    res = evaluate(tiny, benchmarks=[bench], limit=2)
    assert [t.task for t in res.tasks] == ["arith"] and res.task("arith").n == 2
    assert all(len(g) <= 5 and "]" not in g for g in res.task("arith").generations)


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"), ('{"question": "x"}', "'question' and 'answer'"),
])
def test_bad_benchmark_files_are_named(tmp_path, line, message):
    path = tmp_path / "b.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(MoeszError, match=message):
        UserBenchmark(str(path)).examples()


def test_benchmark_options_are_checked(tmp_path):
    with pytest.raises(MoeszError, match="no such benchmark file"):
        UserBenchmark(str(tmp_path / "none.jsonl")).examples()
    with pytest.raises(MoeszError, match="placeholder"):
        UserBenchmark("x.jsonl", template="no placeholder")
    with pytest.raises(MoeszError, match="not a valid regular expression"):
        UserBenchmark("x.jsonl", extract="(")


def test_lm_eval_adapter_says_how_to_install_it(tiny):
    try:  # the adapter is optional; without lm_eval it must fail clearly
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(MoeszError, match="pip install lm-eval"):
            run_lm_eval(tiny, ["gsm8k"], limit=1)
    else:
        pytest.skip("lm_eval is installed; its tasks need downloads this test cannot make")


def test_calibration_needs_texts(tiny):
    with pytest.raises(MoeszError, match="calibration set is empty"):
        calibration_from_texts(tiny.model, tiny.tokenizer, [], "none")


def test_unknown_task_and_bad_limit_are_refused(tiny):
    with pytest.raises(MoeszError, match="unknown task 'mul'"):
        evaluate(tiny, tasks=["mul"], limit=2)
    with pytest.raises(MoeszError, match="at least 1"):
        evaluate(tiny, tasks=["add"], limit=0)


@pytest.mark.slow
def test_the_shipped_model_on_a_small_subsample():
    from profiles.builtin import builtin_dir
    from profiles.traces import record_traces

    if not (builtin_dir() / "model.safetensors").exists():
        pytest.skip("the built-in weights are not trained yet")
    loaded = load_model("builtin")
    res = evaluate(loaded, split="validate", limit=16)
    assert {t.task for t in res.tasks} == {"add", "sub", "sort", "reverse"}
    for t in res.tasks:
        assert t.content.value >= 0.75, (t.task, t.content, t.generations[:4])
    rec = record_traces(loaded, ["add"], "profile", limit=4)
    g = loaded.geometry
    assert len(rec.frame) == sum(x.prompt_tokens + x.fed_tokens for x in rec.generations) \
        * len(g.moe_layers) * g.top_k
