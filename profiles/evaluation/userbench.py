"""User benchmarks from local files, and an optional lm-evaluation-harness adapter.

A benchmark is a JSONL file with one object per line holding `question` and `answer`. GSM8K-style
answers (`reasoning ... #### 42`) are supported: the reference is what follows the last `####`.
Each question is rendered through a prompt template (`{question}` is replaced) and the model's
greedy continuation is scored two ways, mirroring the built-in tasks:

- strict: the answer-extraction pattern (its first group, or the whole match) finds the reference
  in the continuation, e.g. `#### 42` for the default pattern;
- content: the reference appears anywhere in the continuation as a whole number or word.

Numbers are compared after removing thousands separators, `$` and a trailing period, and as values
(`42.0` equals `42`). The adapter to EleutherAI's lm-evaluation-harness runs only when `lm_eval`
is importable; its tasks fetch their own data, and their scores are reported as lm-eval computes
them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from profiles.errors import MoeszError

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_EXTRACT = r"####\s*([^\n]+)"
DEFAULT_STOP = ("\nQuestion:",)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class UserExample:
    """One benchmark item: the rendered prompt, the raw answer and the reference it reduces to."""

    task: str
    prompt: str
    answer: str
    content: str


@dataclass(frozen=True)
class UserBenchmark:
    """A local JSONL benchmark and how to prompt and score it.

    Attributes:
        path: the JSONL file.
        name: the task name in results (default: the file's stem).
        template: prompt text with `{question}`.
        extract: regular expression that finds the strict answer in a continuation.
        max_new_tokens: most tokens generated per question.
        stop: strings that end a continuation early.
        split: `profile` or `validate` keeps only the items whose question hashes to that half
            (`profiles.evaluation.textmetrics.split_of`); None keeps every item.
    """

    path: str
    name: str = ""
    template: str = DEFAULT_TEMPLATE
    extract: str = DEFAULT_EXTRACT
    max_new_tokens: int = 256
    stop: tuple[str, ...] = DEFAULT_STOP
    split: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", Path(self.path).stem)
        if "{question}" not in self.template:
            raise MoeszError(f"prompt template {self.template!r} has no {{question}} placeholder; "
                             f"e.g. {DEFAULT_TEMPLATE!r}")
        try:
            re.compile(self.extract)
        except re.error as exc:
            raise MoeszError(f"answer-extraction pattern {self.extract!r} is not a valid regular "
                             f"expression ({exc})") from None
        if self.max_new_tokens < 1:
            raise MoeszError(f"max_new_tokens {self.max_new_tokens} must be at least 1")
        if self.split is not None:
            from profiles.evaluation.textmetrics import check_split

            check_split(self.split, "benchmark split")

    def to_dict(self) -> dict:
        """How the benchmark is read and scored (what a profile records to reproduce it)."""
        return {"path": self.path, "name": self.name, "template": self.template,
                "extract": self.extract, "max_new_tokens": self.max_new_tokens,
                "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, d: dict, split: str | None = None) -> "UserBenchmark":
        return cls(str(d["path"]), str(d["name"]), str(d["template"]), str(d["extract"]),
                   int(d["max_new_tokens"]), tuple(d.get("stop", DEFAULT_STOP)), split)

    def check_extract(self) -> None:
        """Refuse a pattern that finds the reference in none of the file's answers written out
        (so strict accuracy could never be right).

        Raises:
            MoeszError: no answer of the file matches `extract`.
        """
        items = [(str(i["question"]), str(i["answer"])) for _, i in _read_jsonl(Path(self.path))]
        if not items:
            raise MoeszError(f"{self.path}: no items; expected JSON lines with 'question' and "
                             f"'answer'")
        for _, answer in items:
            m = re.search(self.extract, answer)
            if m is not None and same_answer(m.group(1) if m.groups() else m.group(0),
                                             reference_answer(answer)):
                return
        raise MoeszError(f"{self.path}: the answer-extraction pattern {self.extract!r} finds the "
                         f"reference in none of its {len(items)} answers; give --extract a "
                         f"pattern that matches how the answers are written (e.g. "
                         f"{DEFAULT_EXTRACT!r} for '... #### 42')")

    def examples(self, limit: int | None = None) -> list[UserExample]:
        """The first `limit` items of the file (all when None), in file order."""
        from profiles.evaluation.textmetrics import split_of

        out, seen = [], 0
        for number, item in _read_jsonl(Path(self.path)):
            seen += 1
            if limit is not None and len(out) >= limit:
                break
            if self.split is not None and split_of(str(item["question"])) != self.split:
                continue
            reference = reference_answer(str(item["answer"]))
            if not reference:
                raise MoeszError(f"{self.path} line {number}: empty answer")
            prompt = self.template.replace("{question}", str(item["question"]))
            out.append(UserExample(self.name, prompt, str(item["answer"]), reference))
        if not out and seen:
            raise MoeszError(f"{self.path}: none of its {seen} items falls in the {self.split} "
                             f"half (split by a hash of the question); give more items")
        if not out:
            raise MoeszError(f"{self.path}: no items; expected JSON lines with 'question' and "
                             f"'answer'")
        return out

    def score(self, example: UserExample, generated: str) -> tuple[bool, bool]:
        """(strict, content) correctness of a continuation."""
        m = re.search(self.extract, generated)
        strict = False
        if m is not None:
            strict = same_answer(m.group(1) if m.groups() else m.group(0), example.content)
        return strict, contains_answer(generated, example.content)


def _read_jsonl(path: Path):
    if not path.is_file():
        raise MoeszError(f"{path}: no such benchmark file; expected JSONL with 'question' and "
                         f"'answer' on each line")
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise MoeszError(f"{path} line {number}: not valid JSON; expected one object per "
                                 f"line with 'question' and 'answer'") from None
            if not isinstance(item, dict) or "question" not in item or "answer" not in item:
                raise MoeszError(f"{path} line {number}: expected an object with 'question' and "
                                 f"'answer'")
            yield number, item


def reference_answer(answer: str) -> str:
    """The reference an answer reduces to: the text after the last `####`, or the answer."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    return normalize(answer)


def normalize(text: str) -> str:
    """Strip spaces, `$`, a trailing period and thousands separators; canonical numbers."""
    t = text.strip().rstrip(".").strip().replace("$", "")
    if re.fullmatch(r"-?\d[\d,]*(\.\d+)?", t):
        t = t.replace(",", "")
        value = float(t)
        return str(int(value)) if value.is_integer() else repr(value)
    return t


def same_answer(found: str, reference: str) -> bool:
    return normalize(found) == reference


def contains_answer(text: str, reference: str) -> bool:
    """Whether `reference` occurs in `text` as a whole number (by value) or whole word(s)."""
    if re.fullmatch(r"-?\d+(\.\d+)?", reference):
        return any(normalize(m) == reference for m in _NUMBER.findall(text))
    return re.search(rf"(?<!\w){re.escape(reference)}(?!\w)", text) is not None


def run_lm_eval(loaded, tasks: Sequence[str], limit: int | None = None, batch_size: int = 8,
                num_fewshot: int | None = None) -> dict:
    """Run lm-evaluation-harness tasks on a loaded model (as it is, perturbed or not).

    Returns:
        lm-eval's per-task `results` dictionary (metric name -> value, with its stderr).

    Raises:
        MoeszError: lm-eval is not installed, or the model has no Hugging Face tokenizer.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise MoeszError("lm-evaluation-harness is not installed; `pip install lm-eval` to run "
                         "its tasks, or use a local JSONL benchmark (--bench FILE)") from None
    from profiles.tasks.tokenizer import CharTokenizer

    tokenizer = loaded.tokenizer
    if tokenizer is None or isinstance(tokenizer, CharTokenizer):
        raise MoeszError(f"{loaded.spec}: lm-evaluation-harness needs a Hugging Face tokenizer; "
                         f"the built-in model's character tokenizer cannot run its tasks")
    lm = HFLM(pretrained=loaded.model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                  num_fewshot=num_fewshot)
    return dict(out["results"])
