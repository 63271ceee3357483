"""Evaluate a model on the built-in tasks (and user benchmarks and lm-eval tasks), optionally
against a baseline.

`evaluate` generates greedily on each task's prompts, scores strict and content accuracy with
Wilson intervals, and, given the unperturbed model's `EvalResult` on the same prompts, adds paired
comparisons (Newcombe interval, exact McNemar p). The result is frozen and serializable, so a sweep
evaluates the baseline once (`cached_baseline` keeps it on disk keyed by the model fingerprint)
and pairs every configuration with it. Greedy decoding is deterministic: n is the number of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from profiles.errors import MoeszError
from profiles.evaluation.accuracy import Interval, proportion
from profiles.evaluation.generate import count_tokens, greedy_generate
from profiles.evaluation.paired import PairedComparison, compare_paired, holm_verdicts
from profiles.evaluation.userbench import UserBenchmark
from profiles.fileio import atomic_write_json, read_versioned_json
from profiles.tasks import Example, check_task_names, generate, score

KIND, SCHEMA_VERSION = "eval_result", 1
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TaskResult:
    """One task's measured accuracy, the per-prompt outcomes behind it and, when evaluated
    against a baseline, the paired changes (perturbed minus base)."""

    task: str
    n: int
    strict: Interval
    content: Interval
    prompts: tuple[str, ...]
    generations: tuple[str, ...]
    strict_correct: tuple[bool, ...]
    content_correct: tuple[bool, ...]
    strict_change: PairedComparison | None = None
    content_change: PairedComparison | None = None

    def to_dict(self) -> dict:
        d = {"task": self.task, "n": self.n, "strict": self.strict.to_dict(),
             "content": self.content.to_dict(), "prompts": list(self.prompts),
             "generations": list(self.generations), "strict_correct": list(self.strict_correct),
             "content_correct": list(self.content_correct)}
        for key in ("strict_change", "content_change"):
            value = getattr(self, key)
            d[key] = value.to_dict() if value is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        def change(v):
            return PairedComparison.from_dict(v) if v else None

        return cls(d["task"], int(d["n"]), Interval.from_dict(d["strict"]),
                   Interval.from_dict(d["content"]), tuple(d["prompts"]), tuple(d["generations"]),
                   tuple(map(bool, d["strict_correct"])), tuple(map(bool, d["content_correct"])),
                   change(d.get("strict_change")), change(d.get("content_change")))


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one model condition (`base` or a policy) on a split."""

    model: str
    fingerprint: str | None
    condition: str
    split: str
    limit: int
    seed: int
    tasks: tuple[TaskResult, ...]

    def task(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.task == name:
                return t
        raise MoeszError(f"no task {name!r} in this result; it has "
                         f"{', '.join(t.task for t in self.tasks)}")

    def verdicts(self, alpha: float = 0.05, metric: str = "content"
                 ) -> dict[str, tuple[str, float]]:
        """Holm-corrected verdict and adjusted p per task, the tasks taken as one family."""
        changes = [(t.task, getattr(t, f"{metric}_change")) for t in self.tasks]
        changes = [(name, c) for name, c in changes if c is not None]
        return dict(zip([n for n, _ in changes], holm_verdicts([c for _, c in changes], alpha)))

    def to_dict(self) -> dict:
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, "model": self.model,
                "fingerprint": self.fingerprint, "condition": self.condition,
                "split": self.split, "limit": self.limit, "seed": self.seed,
                "tasks": [t.to_dict() for t in self.tasks]}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        return cls(d["model"], d.get("fingerprint"), d["condition"], d["split"], int(d["limit"]),
                   int(d["seed"]), tuple(TaskResult.from_dict(t) for t in d["tasks"]))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        return cls.from_dict(read_versioned_json(path, KIND, SCHEMA_VERSION))


def task_examples(tasks: Sequence[str] | None, split: str, limit: int, seed: int = 0
                  ) -> dict[str, list[Example]]:
    """`limit` examples of each built-in task (all tasks when `tasks` is empty)."""
    if limit < 1:
        raise MoeszError(f"limit {limit} must be at least 1 prompt per task")
    return {t: generate(t, split, limit, seed) for t in check_task_names(list(tasks or []))}


def answer_budget(tokenizer, examples: Sequence[Example]) -> int:
    """max_new_tokens for a task: its longest answer, the end token, and one token to spare."""
    return max(count_tokens(tokenizer, e.answer) for e in examples) + 2


def evaluate(loaded_or_model, tokenizer=None, tasks: Sequence[str] | None = None,
             split: str = "validate", limit: int = 100, *, seed: int = 0, batch_size: int = 64,
             benchmarks: Sequence[UserBenchmark] = (), baseline: EvalResult | None = None,
             condition: str = "base", progress: Progress | None = None,
             lm_evals: Sequence = ()) -> EvalResult:
    """Greedy accuracy of a model on built-in tasks and user benchmarks; lm-eval tasks as lm-eval
    scores them.

    Args:
        loaded_or_model: a `LoadedModel`, or a transformers model (then pass `tokenizer`).
        tokenizer: overrides the loaded model's tokenizer.
        tasks: built-in task names; None means all, unless `benchmarks` or `lm_evals` are given
            (then none).
        split: `profile` or `validate` (or `train`).
        limit: prompts per task (and most items per benchmark).
        seed: selects the built-in prompts.
        batch_size: prompts per forward pass.
        benchmarks: user JSONL benchmarks, scored like tasks.
        baseline: the unperturbed model's result on the same prompts; adds paired changes.
        condition: what was evaluated, e.g. "base" or a policy's description.
        progress: `progress(done, total, label)` per batch, over all prompts.
        lm_evals: loaded lm-eval tasks (`profiles.evaluation.lmeval.LmEvalTask`), scored per
            document by lm-eval (the first `limit` documents of their half).

    Raises:
        MoeszError: unknown tasks or split, limit < 1, no tokenizer, a baseline evaluated on
            other prompts, or lm-eval tasks on a model without a Hugging Face tokenizer.
    """
    model = getattr(loaded_or_model, "model", loaded_or_model)
    tokenizer = tokenizer if tokenizer is not None else getattr(loaded_or_model, "tokenizer", None)
    if tokenizer is None:
        raise MoeszError("this model has no tokenizer; pass one, or add tokenizer files to the "
                         "checkpoint directory")
    sources = []  # (name, examples, scorer, max_new_tokens, stop)
    if tasks or not (benchmarks or lm_evals):
        for name, exs in task_examples(tasks, split, limit, seed).items():
            sources.append((name, exs, score, answer_budget(tokenizer, exs), ()))
    for bench in benchmarks:
        sources.append((bench.name, bench.examples(limit), bench.score, bench.max_new_tokens,
                        bench.stop))
    total = sum(len(s[1]) for s in sources) + sum(len(t.indices(limit)) for t in lm_evals)
    done, results = 0, []
    for name, exs, scorer, budget, stop in sources:
        report = None if progress is None else (
            lambda d, t, label, base=done: progress(base + d, total, label))
        gens = greedy_generate(model, tokenizer, [e.prompt for e in exs], budget, batch_size,
                               progress=report, stop=stop, label=f"{condition}: {name}")
        done += len(exs)
        marks = [scorer(e, g.text) for e, g in zip(exs, gens)]
        strict, content = [m[0] for m in marks], [m[1] for m in marks]
        result = TaskResult(name, len(exs), proportion(strict), proportion(content),
                            tuple(e.prompt for e in exs), tuple(g.text for g in gens),
                            tuple(strict), tuple(content))
        if baseline is not None:
            result = _paired(result, baseline)
        results.append(result)
    for task in lm_evals:
        if progress is not None:
            progress(done, total, f"{condition}: {task.name} (lm-eval)")
        prompts, shown, right = task.answer(model, tokenizer, limit, batch_size=batch_size)
        done += len(prompts)
        result = TaskResult(task.name, len(prompts), proportion(right), proportion(right),
                            tuple(prompts), tuple(shown), tuple(right), tuple(right))
        results.append(result if baseline is None else _paired(result, baseline))
    if progress is not None and lm_evals:
        progress(done, total, f"{condition}: done")
    return EvalResult(getattr(loaded_or_model, "spec", type(model).__name__),
                      getattr(loaded_or_model, "fingerprint", None), condition, split, limit, seed,
                      tuple(results))


def _paired(result: TaskResult, baseline: EvalResult) -> TaskResult:
    base = baseline.task(result.task)
    if base.prompts != result.prompts:
        raise MoeszError(f"task {result.task!r}: the baseline was evaluated on other prompts "
                         f"(split, limit or seed differ); re-run the baseline with the same ones")
    return replace(result,
                   strict_change=compare_paired(base.strict_correct, result.strict_correct,
                                                "strict"),
                   content_change=compare_paired(base.content_correct, result.content_correct,
                                                 "content"))


def cached_baseline(loaded, path: str | Path, tasks: Sequence[str] | None, split: str,
                    limit: int, *, seed: int = 0, batch_size: int = 64,
                    progress: Progress | None = None) -> EvalResult:
    """The unperturbed model's result, read from `path` when it matches (same fingerprint, split,
    limit, seed and tasks), else evaluated now and saved there. Call it before applying a policy.
    """
    names = check_task_names(list(tasks or []))
    path = Path(path)
    if path.exists():
        cached = EvalResult.load(path)
        have = {t.task for t in cached.tasks}
        if (cached.fingerprint == loaded.fingerprint and cached.condition == "base"
                and (cached.split, cached.limit, cached.seed) == (split, limit, seed)
                and set(names) <= have):
            return replace(cached, tasks=tuple(cached.task(n) for n in names))
    result = evaluate(loaded, tasks=names, split=split, limit=limit, seed=seed,
                      batch_size=batch_size, progress=progress)
    result.save(path)
    return result
