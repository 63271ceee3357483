"""Greedy generation with per-step wall-clock timing: the workload the runtime measures.

One prefill of the whole batch, then `steps` decode steps, each feeding every sequence's last
token through the model with its KV cache — the step structure the simulator replays
(`sim/workload.py`: a prefill step, then `generated_tokens` decode steps). Each step ends when its
next tokens are on the host, which synchronizes the device, so the step times are wall-clock
times of completed work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

StepHook = Callable[[str, int], None]


@dataclass
class Generation:
    """What a generation produced: token ids [batch, steps + 1] (the prefill's argmax first),
    step marks (phase, start_s, end_s) on `time.perf_counter`, and per-step logits if recorded
    ([batch, vocab] float32 on the CPU, one per step)."""

    ids: torch.Tensor
    marks: list[tuple[str, float, float]]
    logits: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, steps: int, *, on_step: StepHook | None = None,
                    record_logits: bool = False) -> Generation:
    """Prefill `input_ids` [batch, prompt] and decode `steps` greedy steps.

    Args:
        model: a transformers causal LM (with or without the offloaded runtime installed).
        input_ids: prompt token ids on the model's device; every row the same length.
        steps: decode steps after the prefill.
        on_step: called as `on_step(phase, step_index)` before each forward pass.
        record_logits: keep each step's last-position logits.
    """
    import inspect

    from transformers import DynamicCache

    cache = DynamicCache()
    # transformers 5 renamed `past_key_values` to `cache` (the old name warns until 5.40)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    marks, logits = [], []
    out_ids = []
    tokens = input_ids
    for step in range(steps + 1):
        phase = "prefill" if step == 0 else "decode"
        if on_step is not None:
            on_step(phase, step)
        t0 = time.perf_counter()
        out = model(input_ids=tokens, use_cache=True, **{key: cache})
        last = out.logits[:, -1, :]
        nxt = last.argmax(dim=-1)
        nxt_host = nxt.to("cpu")          # waits for the device: the step is complete
        marks.append((phase, t0, time.perf_counter()))
        if record_logits:
            logits.append(last.float().to("cpu"))
        out_ids.append(nxt_host)
        cache = getattr(out, key, None) or cache
        tokens = nxt.unsqueeze(1)
    return Generation(torch.stack(out_ids, dim=1), marks, logits)


def synthetic_prompt(batch: int, prompt_tokens: int, vocab_size: int, seed: int = 0,
                     low: int = 3) -> torch.Tensor:
    """Seeded random prompt ids [batch, prompt_tokens] in [low, vocab) (ids below `low` are
    usually padding / BOS / EOS)."""
    gen = torch.Generator().manual_seed(seed)
    low = min(low, max(vocab_size - 1, 0))
    return torch.randint(low, vocab_size, (batch, prompt_tokens), generator=gen)
