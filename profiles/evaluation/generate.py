"""Batched greedy generation with a KV cache, for the built-in model and real checkpoints alike.

Prompts are left-padded into batches (so every row's next token sits in the last column), prefilled
once, then decoded one token per step from the key/value cache until every row has produced an end
token or `max_new_tokens` is reached. Position ids come from the attention mask, so padding never
shifts a row's positions. Greedy decoding is deterministic: the same weights and prompts give the
same tokens, which is what makes paired comparisons between a base and a perturbed model exact.

The tokenizer may be the built-in `CharTokenizer` or any Hugging Face tokenizer; only encoding,
`decode`, `eos_token_id` and `pad_token_id` are used. Callers observe each forward pass through
`on_forward(phase, real, positions)`, which routing traces use to skip padding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from profiles.errors import MoeszError
from profiles.tasks.tokenizer import CharTokenizer

Progress = Callable[[int, int, str], None]
OnForward = Callable[[str, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Generation:
    """The continuation of one prompt.

    Attributes:
        text: decoded continuation, without the end token (and cut before any stop string).
        token_ids: generated ids, without the end token.
        prompt_tokens: the prompt's length in tokens (special tokens included, padding excluded).
        end: why the row stopped: "eos" (an end token), "stop" (a stop string) or "length"
            (`max_new_tokens`).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    end: str

    @property
    def finished(self) -> bool:
        """The row ended by itself (end token or stop string), not by the token budget."""
        return self.end != "length"

    @property
    def fed_tokens(self) -> int:
        """Generated tokens that went back through the model (the decode steps that saw them):
        all of them after an end token; all but the last after a stop string or the budget."""
        return len(self.token_ids) - (0 if self.end == "eos" else 1)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's usual special tokens (BOS for the built-in)."""
    if isinstance(tokenizer, CharTokenizer):
        return list(tokenizer.encode(text))
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def count_tokens(tokenizer, text: str) -> int:
    """Length in tokens of `text` as a continuation (no special tokens)."""
    if isinstance(tokenizer, CharTokenizer):
        return len(tokenizer.encode(text, add_bos=False))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the model's generation config's."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int = 64, progress: Progress | None = None,
                    on_forward: OnForward | None = None, stop: Sequence[str] = (),
                    label: str = "generate") -> list[Generation]:
    """Greedy continuations of `prompts`, in batches, with the model's KV cache.

    Args:
        model: a transformers causal LM in eval mode.
        tokenizer: the built-in `CharTokenizer` or a Hugging Face tokenizer.
        prompts: the prompts, in order; the result has one `Generation` per prompt.
        max_new_tokens: most tokens generated per prompt (the end token included).
        batch_size: prompts per forward pass.
        progress: `progress(done_prompts, total_prompts, label)` after each batch.
        on_forward: called before every forward pass with the phase ("prefill" or "decode"), a
            [batch, seq] bool mask of the real tokens entering the model (padding and rows that
            have already ended are False) and their [batch, seq] positions in their own sequence.
        stop: strings that end a row as soon as its continuation contains one.
        label: the progress label.

    Raises:
        MoeszError: no prompts, max_new_tokens < 1 or batch_size < 1.
    """
    if not prompts:
        raise MoeszError("no prompts to generate from; give at least one example (--limit >= 1)")
    if max_new_tokens < 1 or batch_size < 1:
        raise MoeszError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be "
                         f"at least 1")
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        out.extend(_generate_batch(model, tokenizer, batch, max_new_tokens, on_forward, stop))
        if progress is not None:
            progress(len(out), len(prompts), label)
    return out


@torch.no_grad()
def _generate_batch(model, tokenizer, seqs: list[list[int]], max_new_tokens: int,
                    on_forward: OnForward | None, stop: Sequence[str]) -> list[Generation]:
    device = next(model.parameters()).device
    ends = end_token_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (min(ends) if ends else 0)
    width = max(len(s) for s in seqs)
    rows = len(seqs)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_kw = _cache_keyword(model)
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(rows)]
    ended = ["length"] * rows
    if on_forward is not None:
        on_forward("prefill", mask.bool(), positions)
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = _cache_of(result)
    for step in range(max_new_tokens):
        token = result.logits[:, -1, :].float().argmax(-1)
        for r in alive.nonzero().flatten().tolist():
            t = int(token[r])
            if t in ends:
                ended[r], alive[r] = "eos", False
                continue
            generated[r].append(t)
            if stop and any(s in tokenizer.decode(generated[r]) for s in stop):
                ended[r], alive[r] = "stop", False
        if not bool(alive.any()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        if on_forward is not None:
            on_forward("decode", alive[:, None].clone(), positions)
        result = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                       use_cache=True, **{cache_kw: cache})
        cache = _cache_of(result)
    return [Generation(_decode(tokenizer, g, stop), tuple(g), len(s), e)
            for g, s, e in zip(generated, seqs, ended)]


def _decode(tokenizer, ids: list[int], stop: Sequence[str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for s in stop:
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text


def _cache_keyword(model) -> str:
    """transformers 5.x renamed the forward argument `past_key_values` to `cache`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(result):
    cache = result.get("cache") if hasattr(result, "get") else None
    return cache if cache is not None else result.past_key_values
