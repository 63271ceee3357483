"""What a profile measures its model with: built-in tasks, user JSONL benchmarks,
lm-evaluation-harness tasks and a text corpus, and the `metrics` record of `profile.json` that
names every metric a budget may use.

Metrics (docs/model-profile.md, "Metrics"):

- `content`, `strict`: accuracy averaged over the profile's tasks (built-in and benchmarks);
- one per task, by its name (a benchmark's file stem, an lm-eval task's name, `add`, ...): that
  task's content accuracy (for an lm-eval task, its per-document primary metric, `acc` or
  `exact_match`);
- `kl`: next-token KL(base || perturbed) in nats per token on the text corpus (or, without
  `--text`, on the built-in tasks' prompts and answers), with a bootstrap interval;
- `ppl`: the perplexity ratio perturbed / base on the same text (a budget `ppl=1.01` allows 1 %).

Benchmarks, lm-eval tasks' documents and the text corpus are split into disjoint `profile` and
`validate` halves by a stable hash (`profiles.evaluation.textmetrics.split_of`), recorded in the
profile so `moesz validate` measures the other half.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from profiles.errors import ConfigError, MoeszError
from profiles.evaluation.lmeval import SPLIT_METHOD as LM_EVAL_SPLIT
from profiles.evaluation.textmetrics import (DEFAULT_MAX_TOKENS, DEFAULT_SEQ_TOKENS, SPLIT_METHOD,
                                             TextCorpus, read_text)
from profiles.evaluation.userbench import DEFAULT_EXTRACT, DEFAULT_TEMPLATE, UserBenchmark

TEXT_ROW = "(text)"   # the task of a point's row when the profile has no accuracy task
BUILTIN_TEXT = "built-in task prompts and answers"
AGGREGATE_METRICS = ("content", "strict", "kl", "ppl")


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation set of a profile, without the model: tasks, benchmarks, text."""

    tasks: tuple[str, ...]
    benches: tuple[UserBenchmark, ...]
    text: str | None
    text_tokens: int | None = DEFAULT_MAX_TOKENS   # None: the model's default budget
    seq_tokens: int = DEFAULT_SEQ_TOKENS
    lm_evals: tuple = ()          # profiles.evaluation.lmeval.LmEvalTask, loaded

    def with_split(self, split: str) -> "EvalSpec":
        return replace(self, benches=tuple(replace(b, split=split) for b in self.benches),
                       lm_evals=tuple(replace(t, split=split) for t in self.lm_evals))

    def task_names(self) -> list[str]:
        return list(self.tasks) + [b.name for b in self.benches] + [t.name for t in self.lm_evals]

    def corpus(self, loaded, split: str) -> TextCorpus | None:
        """The text half, tokenized for `loaded`; None without --text."""
        if self.text is None:
            return None
        return read_text(self.text, loaded.tokenizer, split, self.seq_tokens, self.text_tokens,
                         loaded.model)

    def text_record(self) -> dict | None:
        if self.text is None:
            return None
        return {"path": str(Path(self.text).resolve()), "sha256": _sha256(self.text),
                "seq_tokens": self.seq_tokens, "max_tokens": self.text_tokens}

    def identity(self) -> dict:
        """What must not change between a profile's runs (a sweep's storage records it)."""
        out = {"benches": [{**b.to_dict(), "sha256": _sha256(b.path)} for b in self.benches],
               "text": self.text_record()}
        if self.lm_evals:   # absent otherwise: older sweeps keep matching
            out["lm_eval"] = [t.to_dict() for t in self.lm_evals]
        return out


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def eval_spec(tasks: Sequence[str] | None, bench: Sequence[str] = (), template: str | None = None,
              extract: str | None = None, max_new_tokens: int = 256, text: str | None = None,
              text_tokens: int | None = DEFAULT_MAX_TOKENS, lm_eval: str | None = None,
              split: str = "profile") -> EvalSpec:
    """Check the evaluation options before any model is loaded.

    Built-in tasks default to all of them unless a benchmark, an lm-eval task or a text is given
    (they suit only the built-in model); `tasks` then adds them explicitly. lm-eval tasks are
    loaded with their data now (`profiles.evaluation.lmeval.load_tasks`), offline.

    Raises:
        ConfigError: an unknown task, a bad template or pattern, an empty or malformed JSONL file,
            a pattern that extracts no answer, a missing or empty text file, two tasks with the
            same name; for --lm-eval: lm-eval not installed, an unreadable task YAML, an unknown
            task name, data that are not local.
    """
    from profiles.tasks import check_task_names

    lm_evals = ()
    if lm_eval:
        from profiles.evaluation.lmeval import load_tasks

        lm_evals = load_tasks(lm_eval, split)
    names = list(tasks or [])
    try:
        builtin = tuple(check_task_names(names or None)) \
            if names or not (bench or text or lm_evals) else ()
        benches = []
        for path in bench:
            b = UserBenchmark(str(path), template=template or DEFAULT_TEMPLATE,
                              extract=extract or DEFAULT_EXTRACT, max_new_tokens=max_new_tokens,
                              split=split)
            b.examples()        # reads and checks every line now, not after the model load
            if extract is not None:
                b.check_extract()
            benches.append(b)
    except ConfigError:
        raise
    except MoeszError as exc:
        raise ConfigError(str(exc)) from None
    seen = set(builtin)
    for b in benches:
        if b.name in seen or b.name in AGGREGATE_METRICS or b.name == TEXT_ROW:
            raise ConfigError(f"--bench {b.path}: the task name {b.name!r} is taken (a built-in "
                              f"task, another benchmark or a metric); rename the file")
        seen.add(b.name)
    for t in lm_evals:
        if t.name in seen or t.name in AGGREGATE_METRICS or t.name == TEXT_ROW:
            raise ConfigError(f"--lm-eval {t.source}: the task name {t.name!r} is taken (a "
                              f"built-in task, a benchmark or a metric); rename the task")
        seen.add(t.name)
    if text is not None:
        _check_text_file(text)
    if text_tokens is not None and text_tokens < 1:
        raise ConfigError(f"--text-tokens {text_tokens} must be at least 1")
    return EvalSpec(builtin, tuple(benches), None if text is None else str(text), text_tokens,
                    lm_evals=lm_evals)


def _check_text_file(text: str) -> None:
    from profiles.evaluation.textmetrics import read_text_file

    read_text_file(text)


def metrics_record(spec: EvalSpec, corpus_desc: str) -> dict:
    """The `metrics` field of profile.json."""
    tasks = spec.task_names()
    available = (["content", "strict"] if tasks else []) + ["kl", "ppl"] + tasks
    return {
        "available": available,
        "tasks": tasks,
        "builtin_tasks": list(spec.tasks),
        "benchmarks": [b.to_dict() for b in spec.benches],
        **({"lm_eval": [{**t.to_dict(), "split_method": LM_EVAL_SPLIT}
                        for t in spec.lm_evals]} if spec.lm_evals else {}),
        "text": spec.text_record(),
        "kl": {"unit": "nats per token", "corpus": corpus_desc,
               "interval": "95% percentile bootstrap over sequences"},
        "ppl": {"unit": "perplexity ratio (perturbed / base); drops are ratio - 1",
                "corpus": corpus_desc},
        "split_method": SPLIT_METHOD,
    }


def profile_metrics(doc: dict) -> dict:
    """The `metrics` record of a profile document; for profiles made before it existed, what
    their rows hold (content, strict, kl on the built-in calibration, and each task)."""
    if isinstance(doc.get("metrics"), dict):
        return doc["metrics"]
    tasks = list(doc.get("tasks") or [])
    return {"available": ["content", "strict", "kl"] + tasks, "tasks": tasks,
            "builtin_tasks": tasks, "benchmarks": [], "text": None,
            "kl": {"unit": "nats per token", "corpus": BUILTIN_TEXT, "interval": None},
            "split_method": "built-in task splits"}


def check_metric(metric: str, metrics: dict, where: str) -> None:
    """Refuse a metric the profile does not have, naming those it has.

    Raises:
        ConfigError: `metric` is not in `metrics["available"]`.
    """
    have = list(metrics.get("available") or [])
    if metric not in have:
        hint = ("; add a benchmark with --bench FILE or --lm-eval TASK when profiling"
                if metric not in
                AGGREGATE_METRICS else "; profile with --bench FILE or the built-in tasks for "
                "accuracy, or --text FILE for kl and ppl")
        raise ConfigError(f"budget metric {metric!r} is not in {where}; it has "
                          f"{', '.join(have) or 'none'}{hint}")


def spec_from_record(metrics: dict) -> EvalSpec:
    """The evaluation set a profile (or a plan copying its record) was made with."""
    text = metrics.get("text") or None
    lm_evals = ()
    if metrics.get("lm_eval"):   # loaded again, with their data (lm-eval must be installed)
        from profiles.evaluation.lmeval import from_records

        lm_evals = from_records(metrics["lm_eval"])
    return EvalSpec(tuple(metrics.get("builtin_tasks") or ()),
                    tuple(UserBenchmark.from_dict(b) for b in metrics.get("benchmarks") or ()),
                    None if text is None else text["path"],
                    text.get("max_tokens") if text else DEFAULT_MAX_TOKENS,
                    int(text["seq_tokens"]) if text else DEFAULT_SEQ_TOKENS, lm_evals)


__all__ = ["AGGREGATE_METRICS", "EvalSpec", "TEXT_ROW", "check_metric", "eval_spec",
           "metrics_record", "profile_metrics", "spec_from_record"]
