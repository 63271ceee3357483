"""What a profile measures its model with: built-in tasks, user JSONL benchmarks and a text corpus,
and the `metrics` record of `profile.json` that names every metric a budget may use.

Metrics (docs/model-profile.md, "Metrics"):

- `content`, `strict`: accuracy averaged over the profile's tasks (built-in and benchmarks);
- one per task, by its name (a benchmark's file stem, `add`, ...): that task's content accuracy;
- `kl`: next-token KL(base || perturbed) in nats per token on the text corpus (or, without
  `--text`, on the built-in tasks' prompts and answers), with a bootstrap interval;
- `ppl`: the perplexity ratio perturbed / base on the same text (a budget `ppl=1.01` allows 1 %).

Benchmarks and the text corpus are split into disjoint `profile` and `validate` halves by a stable
hash (`profiles.evaluation.textmetrics.split_of`), recorded in the profile so `moesz validate`
measures the other half.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from profiles.errors import ConfigError, MoeszError
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

    def with_split(self, split: str) -> "EvalSpec":
        return replace(self, benches=tuple(replace(b, split=split) for b in self.benches))

    def task_names(self) -> list[str]:
        return list(self.tasks) + [b.name for b in self.benches]

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
        return {"benches": [{**b.to_dict(), "sha256": _sha256(b.path)} for b in self.benches],
                "text": self.text_record()}


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def eval_spec(tasks: Sequence[str] | None, bench: Sequence[str] = (), template: str | None = None,
              extract: str | None = None, max_new_tokens: int = 256, text: str | None = None,
              text_tokens: int | None = DEFAULT_MAX_TOKENS, lm_eval: str | None = None,
              split: str = "profile") -> EvalSpec:
    """Check the evaluation options before any model is loaded.

    Built-in tasks default to all of them unless a benchmark or a text is given (they suit only
    the built-in model); `tasks` then adds them explicitly.

    Raises:
        ConfigError: an unknown task, lm-eval requested, a bad template or pattern, an empty or
            malformed JSONL file, a pattern that extracts no answer, a missing or empty text file,
            two benchmarks with the same name.
    """
    from profiles.tasks import check_task_names

    if lm_eval:
        _lm_eval_line(lm_eval)
    names = list(tasks or [])
    try:
        builtin = tuple(check_task_names(names or None)) if names or not (bench or text) else ()
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
    if text is not None:
        _check_text_file(text)
    if text_tokens is not None and text_tokens < 1:
        raise ConfigError(f"--text-tokens {text_tokens} must be at least 1")
    return EvalSpec(builtin, tuple(benches), None if text is None else str(text), text_tokens)


def _lm_eval_line(tasks: str) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"--lm-eval {tasks}: lm-evaluation-harness is not installed here; "
                          f"`pip install lm-eval` with its task data available locally, or give "
                          f"the same questions as a JSONL file (--bench FILE)") from None
    raise ConfigError(f"--lm-eval {tasks}: profiling with lm-eval tasks is not supported yet "
                      f"(`moesz model eval` runs them on one model); export the task's questions "
                      f"to JSONL and give --bench FILE")


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
        hint = ("; add a benchmark with --bench FILE when profiling" if metric not in
                AGGREGATE_METRICS else "; profile with --bench FILE or the built-in tasks for "
                "accuracy, or --text FILE for kl and ppl")
        raise ConfigError(f"budget metric {metric!r} is not in {where}; it has "
                          f"{', '.join(have) or 'none'}{hint}")


def spec_from_record(metrics: dict) -> EvalSpec:
    """The evaluation set a profile (or a plan copying its record) was made with."""
    text = metrics.get("text") or None
    return EvalSpec(tuple(metrics.get("builtin_tasks") or ()),
                    tuple(UserBenchmark.from_dict(b) for b in metrics.get("benchmarks") or ()),
                    None if text is None else text["path"],
                    text.get("max_tokens") if text else DEFAULT_MAX_TOKENS,
                    int(text["seq_tokens"]) if text else DEFAULT_SEQ_TOKENS)


__all__ = ["AGGREGATE_METRICS", "EvalSpec", "TEXT_ROW", "check_metric", "eval_spec",
           "metrics_record", "profile_metrics", "spec_from_record"]
