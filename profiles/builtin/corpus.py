"""The text corpus shipped with the built-in model (`corpus.txt`), and how it is made.

One document per example (blank lines between them): a built-in task's prompt and answer from
the tasks' `train` split, so the corpus never holds an example the profiler or `moesz validate`
asks as a question. `python -m profiles.builtin.corpus` writes it:

- every task draws `BLOCKS[-1]` examples (`profiles.tasks.generate`, seed `SEED`);
- block k holds each task's examples `BLOCKS[k-1]:BLOCKS[k]`, the tasks interleaved by a shuffle
  seeded with k, and the blocks follow one another.

The first block (2,000 per task) is the corpus of commit 8cc6c9d, byte for byte; the later ones
only append, so a text budget that stops early (the demo's 16,384 tokens) reads the same
sequences as before while the default budget reads more. More tokens tighten the KL intervals:
the half-width shrinks as 1/sqrt(tokens) (benchmarks/RESULTS.md, "Per-layer KL and its
interval").
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus.txt"
SEED = 7
BLOCKS = (2000, 10000)     # cumulative examples per task at the end of each block


def documents(path: Path = CORPUS) -> list[str]:
    """The corpus's documents, in file order."""
    text = path.read_text(encoding="utf-8")
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def build(blocks: tuple[int, ...] = BLOCKS, seed: int = SEED) -> list[str]:
    """The corpus's documents as `main` writes them."""
    from profiles.tasks import TASKS, generate

    per_task = {t: [e.prompt + e.answer for e in generate(t, "train", blocks[-1], seed)]
                for t in TASKS}
    out: list[str] = []
    for k, (lo, hi) in enumerate(zip((0,) + tuple(blocks[:-1]), blocks)):
        block = [x for t in TASKS for x in per_task[t][lo:hi]]
        random.Random(k).shuffle(block)
        out += block
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the built-in model's text corpus.")
    ap.add_argument("--out", type=Path, default=CORPUS)
    args = ap.parse_args(argv)
    docs = build()
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"{args.out}: {len(docs)} documents")


if __name__ == "__main__":
    main()
