"""Small lm-evaluation-harness tasks with local data: a multiple-choice (and a generate_until) task
YAML and its JSONL documents, written side by side (the YAML names its data file relative to
itself)."""

from __future__ import annotations

import json
import random
from pathlib import Path

TASK = "tiny_sums"
YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: sums.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = "tiny_sums_gen"
GEN_YAML = f"""task: {GEN_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: sums.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_gen_task(root: str | Path, docs: int = 40) -> Path:
    """The same questions as a generate_until task (`root/tiny_sums_gen.yaml`, exact match)."""
    write_task(root, docs)
    path = Path(root) / f"{GEN_TASK}.yaml"
    path.write_text(GEN_YAML, encoding="utf-8")
    return path


def write_task(root: str | Path, docs: int = 40, seed: int = 0) -> Path:
    """`root/tiny_sums.yaml` and `root/sums.jsonl` (`docs` questions with four choices, the first
    right); returns the YAML's path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with (root / "sums.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(docs):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            choices = [str(a + b), str(a + b + 1), str(a * b + 2), str(abs(a - b) + 20)]
            fh.write(json.dumps({"id": i, "question": f"what is {a} plus {b}?",
                                 "choices": choices, "label": 0}) + "\n")
    path = root / f"{TASK}.yaml"
    path.write_text(YAML, encoding="utf-8")
    return path
