"""The built-in tasks: deterministic generators with operand-disjoint splits.

Four tasks, two of which need the feed-forward experts' arithmetic (REFERENCE section 7: sorting and
reversal are largely solved by attention, addition and subtraction are not):

| task | prompt | required answer | content |
|---|---|---|---|
| `add` | `347+589=` | `[639]` (936 written least-significant digit first) | `639` |
| `sub` | `912-347=` | `[565]` (565 = 912-347, least-significant digit first) | `565` |
| `sort` | `S583920=` | `[023589]` | `023589` |
| `reverse` | `R5839201=` | `[1029385]` | `1029385` |

Answers are written least-significant digit first, which suits a left-to-right model. *Strict*
accuracy (the study's ICA) needs the generated text to be exactly the bracketed answer; *content*
accuracy (the study's PIA) needs the answer's digits as one digit run anywhere in the output.

Splits are disjoint in their operands, not only in their draws: an operand tuple belongs to exactly
one split, chosen by a stable hash of the tuple (80 % `train`, 10 % `profile`, 10 % `validate`).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable

from profiles.errors import MoeszError

SPLITS = ("train", "profile", "validate")
_SPLIT_BUCKETS = {"train": range(0, 80), "profile": range(80, 90), "validate": range(90, 100)}
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Example:
    """One prompt with its required answer text and the answer's content."""

    task: str
    prompt: str
    answer: str   # the exact text required after the prompt (strict accuracy)
    content: str  # the answer's digits (content accuracy)


@dataclass(frozen=True)
class Task:
    """A built-in task: a name, an operand sampler and a solver."""

    name: str
    needs_experts: bool
    description: str
    sample_operands: Callable[[random.Random], tuple]
    render: Callable[[tuple], tuple[str, str]]  # operands -> (prompt, content)

    def example(self, operands: tuple) -> Example:
        prompt, content = self.render(operands)
        return Example(self.name, prompt, f"[{content}]", content)


def _rev(n: int) -> str:
    return str(n)[::-1]


def _add_ops(rng: random.Random) -> tuple:
    return rng.randint(100, 999), rng.randint(100, 999)


def _sub_ops(rng: random.Random) -> tuple:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return (a, b) if a >= b else (b, a)


def _digits_ops(n: int) -> Callable[[random.Random], tuple]:
    return lambda rng: tuple(rng.randint(0, 9) for _ in range(n))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", True, "3-digit addition, answer least-significant digit first", _add_ops,
             lambda o: (f"{o[0]}+{o[1]}=", _rev(o[0] + o[1]))),
        Task("sub", True, "3-digit subtraction a-b with a>=b, answer least-significant digit first",
             _sub_ops, lambda o: (f"{o[0]}-{o[1]}=", _rev(o[0] - o[1]))),
        Task("sort", False, "sort 6 digits ascending", _digits_ops(6),
             lambda o: ("S" + "".join(map(str, o)) + "=", "".join(map(str, sorted(o))))),
        Task("reverse", False, "reverse 7 digits", _digits_ops(7),
             lambda o: ("R" + "".join(map(str, o)) + "=", "".join(map(str, o[::-1])))),
    )
}


def split_of(task: str, operands: tuple) -> str:
    """The split an operand tuple belongs to, from a stable hash (not Python's salted `hash`)."""
    digest = hashlib.blake2b(f"{task}:{operands}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 100
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


def check_task_names(names: list[str] | None) -> list[str]:
    """Validate task names; `None` means all built-in tasks."""
    if not names:
        return list(TASKS)
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise MoeszError(f"unknown task {bad[0]!r}; built-in tasks are {', '.join(TASKS)}")
    return list(names)


def generate(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `task` from `split`, deterministic for a given seed.

    Raises:
        MoeszError: unknown task or split, or a split too small for `n` distinct examples.
    """
    check_task_names([task])
    if split not in SPLITS:
        raise MoeszError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    t = TASKS[task]
    rng = random.Random(f"{task}:{split}:{seed}")
    seen: set[tuple] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise MoeszError(f"task {task!r} split {split!r} has fewer than {n} distinct examples")
        ops = t.sample_operands(rng)
        if ops in seen or split_of(task, ops) != split:
            continue
        seen.add(ops)
        out.append(t.example(ops))
    return out


def score(example: Example, generated: str) -> tuple[bool, bool]:
    """(strict, content) correctness of a generated continuation of `example.prompt`.

    Strict: the continuation, stripped of surrounding spaces, is exactly the bracketed answer.
    Content: some maximal digit run of the continuation equals the answer's digits.
    """
    text = generated.strip()
    strict = text == example.answer
    content = any(m == example.content for m in _DIGITS.findall(text))
    return strict, content
