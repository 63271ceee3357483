"""How many intra-op threads torch uses while a model is evaluated on the CPU.

The built-in model's matrices are small: on this project's 2-core reference machine, greedy
evaluation of 400 prompts took 17 s with one torch thread and 21 s with two when idle, and two
threads collapse to a fraction of that when another job shares the cores (threads spin waiting for
each other). Evaluation therefore runs single-threaded by default; run one worker per core to use
more cores (benchmarks/RESULTS.md, "Built-in model").
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from profiles.errors import ConfigError

DEFAULT_THREADS = 1


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None: leave torch's setting), then restore.

    Raises:
        ConfigError: `n` is smaller than 1.
    """
    if n is None:
        yield
        return
    if n < 1:
        raise ConfigError(f"--threads {n} is invalid; give 1 or more")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
