"""lm-evaluation-harness tasks as paired per-document metrics (profiles.evaluation.lmeval): a local
task YAML, its halves, per-document scores paired against the unperturbed model, and the one-line
errors."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from profiles.errors import ConfigError, MoeszError
from tests.profiles.eval_helpers import one_torch_thread, save_text_checkpoint  # noqa: F401
from tests.profiles.lmeval_helpers import GEN_TASK, TASK, write_gen_task, write_task

NEEDS = "lm-eval[hf]==0.4.13 is optional (pip install moesz[lmeval])"


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    pytest.importorskip("lm_eval.models.huggingface", reason=NEEDS)
    return write_task(tmp_path_factory.mktemp("lmeval") / "task")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from profiles.models import load_model

    return load_model(str(save_text_checkpoint("mixtral", tmp_path_factory.mktemp("ck") / "c")))


def test_a_yaml_task_loads_offline_with_data_beside_it(task_yaml, tmp_path, monkeypatch):
    from profiles.evaluation.lmeval import load_tasks

    monkeypatch.chdir(tmp_path)   # the data file is found beside the YAML, not in the cwd
    (t,) = load_tasks(str(task_yaml), "profile")
    assert (t.name, t.output_type, t.metric, t.num_fewshot, t.docs) == \
        (TASK, "multiple_choice", "acc", 0, 40)
    assert t.source == str(task_yaml.resolve()) and len(t.docs_sha256) == 64
    profile = set(t.indices())
    validate = set(replace(t, split="validate").indices())
    assert profile and validate and not profile & validate
    assert profile | validate == set(range(40)) == set(replace(t, split=None).indices())
    assert t.indices(3) == sorted(profile)[:3]
    assert t.to_dict()["source"] == t.source


def test_documents_are_paired_one_by_one(task_yaml, loaded):
    from profiles.evaluation import evaluate
    from profiles.evaluation.lmeval import load_tasks
    from profiles.policy import Policy, StorageSpec, apply_policy

    (t,) = load_tasks(str(task_yaml), "validate")
    base = evaluate(loaded, lm_evals=[t], limit=10, batch_size=16)
    (r,) = base.tasks
    assert r.task == TASK and r.n == 10 and r.strict_correct == r.content_correct
    assert all(p.startswith("Question: what is ") and p.endswith("\nAnswer:") for p in r.prompts)
    assert all(g.isdigit() for g in r.generations)   # the chosen choice
    prompts, _, right = t.answer(loaded.model, loaded.tokenizer, 10, 4, 7)
    assert prompts == list(r.prompts[4:7]) and right == list(r.content_correct[4:7])
    with apply_policy(loaded, Policy(default=StorageSpec.parse("rtn4"))):
        pert = evaluate(loaded, lm_evals=[t], limit=10, batch_size=16, baseline=base,
                        condition="rtn4")
    c = pert.tasks[0].content_change
    assert c.n == 10 and c.both + c.gained + c.lost + c.neither == 10
    assert c.change.low <= c.change.value <= c.change.high
    assert set(pert.verdicts()) == {TASK}


def test_few_shot_prompts_are_the_same_on_every_call_and_drawn_from_the_half(task_yaml, loaded,
                                                                              tmp_path):
    from profiles.evaluation.lmeval import load_tasks

    yaml = write_task(tmp_path / "fs")
    yaml.write_text(yaml.read_text() + "num_fewshot: 2\n")   # examples from the test split
    (t,) = load_tasks(str(yaml), "profile")
    assert t.num_fewshot == 2
    once, _, right = t.answer(loaded.model, loaded.tokenizer, 6, batch_size=8)
    again, _, _ = t.answer(loaded.model, loaded.tokenizer, 6, batch_size=8)
    head, _, _ = t.answer(loaded.model, loaded.tokenizer, 6, 0, 2, batch_size=8)
    tail, _, _ = t.answer(loaded.model, loaded.tokenizer, 6, 2, 6, batch_size=8)
    assert once == again == head + tail and len(once) == 6
    docs = t.loaded.docs
    mine = {docs[i]["question"] for i in t.indices()}
    theirs = {docs[i]["question"] for i in replace(t, split="validate").indices()} - mine
    shots = [p.rsplit("Question:", 1)[0] for p in once]
    assert all(p.count("Answer:") == 2 for p in shots)
    assert not [q for q in theirs for p in shots if f"Question: {q}" in p]


def test_a_document_is_never_its_own_few_shot_example(loaded, tmp_path):
    from profiles.evaluation.lmeval import load_tasks

    pytest.importorskip("lm_eval.models.huggingface", reason=NEEDS)
    yaml = write_task(tmp_path / "self", docs=12)    # a pool of 6: its own answer 1 in 2 times
    yaml.write_text(yaml.read_text().replace("Question: {{question}}",
                                             "Question {{id}}: {{question}}") + "num_fewshot: 3\n")
    for split in ("profile", "validate"):
        (t,) = load_tasks(str(yaml), split)
        prompts, _, _ = t.answer(loaded.model, loaded.tokenizer, None, batch_size=8)
        for i, p in zip(t.indices(), prompts):
            shots, asked = p.rsplit("Question ", 1)
            assert asked.startswith(f"{i}:") and shots.count("Answer:") == 3
            assert f"Question {i}:" not in shots, (split, i)
    yaml.write_text(yaml.read_text().replace("num_fewshot: 3", "num_fewshot: 6"))
    (t,) = load_tasks(str(yaml), "profile")
    with pytest.raises(MoeszError, match="not more than num_fewshot=6; give the task a "
                                         "fewshot_split or more documents"):
        t.answer(loaded.model, loaded.tokenizer, None, batch_size=8)


def test_a_generate_until_task_is_scored_by_exact_match(task_yaml, loaded):
    from profiles.evaluation.lmeval import load_tasks

    (t,) = load_tasks(str(write_gen_task(task_yaml.parent)), "profile")
    assert (t.name, t.output_type, t.metric) == (GEN_TASK, "generate_until", "exact_match")
    prompts, shown, right = t.answer(loaded.model, loaded.tokenizer, 3, batch_size=4)
    assert len(prompts) == len(shown) == len(right) == 3
    assert all(isinstance(g, str) and len(g) <= 40 for g in shown)


@pytest.mark.parametrize("aggregation,want", [("mean", "lm-eval cannot score its documents"),
                                               ("bleu", r"not right \(1\) or wrong \(0\)")])
def test_a_task_lm_eval_cannot_score_per_document_is_one_line(task_yaml, loaded, tmp_path,
                                                              aggregation, want):
    from profiles.evaluation.lmeval import load_tasks

    yaml = write_gen_task(tmp_path / "bleu")
    yaml.write_text(yaml.read_text().replace("metric: exact_match\n    aggregation: mean",
                                             f"metric: bleu\n    aggregation: {aggregation}"))
    (t,) = load_tasks(str(yaml), "profile")
    with pytest.raises(MoeszError, match=want) as err:
        t.answer(loaded.model, loaded.tokenizer, 2, batch_size=2)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--lm-eval {GEN_TASK}: ")


def test_a_recorded_task_loads_again_and_refuses_changed_documents(task_yaml, tmp_path):
    from profiles.evaluation.lmeval import from_records, load_tasks

    (t,) = load_tasks(str(task_yaml))
    (again,) = from_records([t.to_dict()], "validate")
    assert again == replace(t, split="validate")
    with pytest.raises(ConfigError, match="its documents changed since the profile"):
        from_records([{**t.to_dict(), "docs_sha256": "0" * 64}])


def test_a_recorded_task_scored_otherwise_now_is_refused(tmp_path):
    from profiles.evaluation.lmeval import from_records, load_tasks

    pytest.importorskip("lm_eval.models.huggingface", reason=NEEDS)
    yaml = write_task(tmp_path / "t")
    (t,) = load_tasks(str(yaml))
    record = t.to_dict()
    yaml.write_text(yaml.read_text() + "num_fewshot: 3\n")   # same documents, other prompts
    with pytest.raises(ConfigError) as err:
        from_records([record])
    assert "(num_fewshot 3 now, 0 then); profile again" in str(err.value)
    yaml.write_text(yaml.read_text().replace("metric: acc", "metric: acc_norm"))
    with pytest.raises(ConfigError, match="metric acc_norm now, acc then"):
        from_records([{**record, "num_fewshot": 3}])


def test_a_recorded_task_with_another_template_is_refused(tmp_path):
    from profiles.evaluation.lmeval import from_records, load_tasks

    pytest.importorskip("lm_eval.models.huggingface", reason=NEEDS)
    yaml = write_task(tmp_path / "t")
    (t,) = load_tasks(str(yaml))
    record = t.to_dict()
    assert len(record["prompts_sha256"]) == 64
    assert from_records([record])[0].prompts_sha256 == record["prompts_sha256"]   # stable
    yaml.write_text(yaml.read_text().replace("Answer:", "The answer is"))   # same documents
    with pytest.raises(ConfigError, match="its prompts changed since the profile was made"):
        from_records([record])
    old = {k: v for k, v in record.items() if k != "prompts_sha256"}   # recorded before
    assert from_records([old])[0].docs_sha256 == record["docs_sha256"]


@pytest.mark.parametrize("case", ["missing", "not-yaml", "group", "no-data", "empty"])
def test_bad_task_files_are_one_line(task_yaml, tmp_path, case):
    from profiles.evaluation.lmeval import load_tasks

    path = tmp_path / "t.yaml"
    text = task_yaml.read_text()
    if case == "missing":
        want = "no such task YAML file"
    elif case == "not-yaml":
        path.write_text("task: [unclosed\n")
        want = "not a readable lm-eval task YAML"
    elif case == "group":
        path.write_text("group: g\ntask: [a, b]\n")
        want = "expected one task"
    elif case == "no-data":
        path.write_text(text.replace("sums.jsonl", str(tmp_path / "absent.jsonl")))
        want = "cannot be loaded offline"
    else:
        want = "--lm-eval is empty"
        path = " , "
    with pytest.raises(ConfigError) as err:
        load_tasks(str(path))
    msg = str(err.value)
    assert want in msg and "\n" not in msg


def test_the_builtin_tokenizer_is_refused():
    from profiles.evaluation.lmeval import check_tokenizer
    from profiles.tasks.tokenizer import CharTokenizer

    with pytest.raises(MoeszError, match="character tokenizer cannot run its tasks"):
        check_tokenizer(CharTokenizer(), TASK)


def test_without_lm_eval_the_line_says_how_to_install_it(monkeypatch):
    from profiles.evaluation.lmeval import load_tasks

    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)
    with pytest.raises(ConfigError, match=r"not installed here; `pip install moesz\[lmeval\]`"):
        load_tasks("whatever.yaml")
