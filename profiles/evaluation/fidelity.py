"""Label-free fidelity: how far a perturbed model's next-token distributions move from the base
model's, and perplexity on a local text.

On a fixed calibration set (the built-in tasks' `profile` prompts with their answers, or any texts)
the base model's next-token log-probabilities are computed once (`base_distributions`), then each
perturbed model is compared position by position:

- mean KL(base || perturbed) = mean over positions of
  sum_v p_base(v) (log p_base(v) - log p_pert(v)), in nats;
- top-1 agreement: the share of positions where both models' most likely next token is the same.

Neither needs labels, so they also work for checkpoints the built-in tasks do not suit. Positions
of one sequence are correlated, so no binomial interval is attached; the counts are reported.
Memory: the base cache holds positions x vocabulary float32 values (1 000 positions of a 150 k
vocabulary take 600 MB), so keep real-model calibration sets small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from profiles.errors import MoeszError
from profiles.evaluation.generate import count_tokens, encode_prompt, end_token_ids


@dataclass(frozen=True)
class Calibration:
    """Token sequences (right-padded) on which distributions are compared."""

    input_ids: torch.Tensor       # [sequences, seq] int64
    attention_mask: torch.Tensor  # [sequences, seq] 1 for real tokens
    description: str


@dataclass(frozen=True)
class BaseDistributions:
    """The base model's next-token log-probabilities at every real calibration position."""

    log_probs: torch.Tensor  # [positions, vocab] float32
    calibration: Calibration


@dataclass(frozen=True)
class FidelityResult:
    mean_kl_nats: float
    max_kl_nats: float
    top1_agreement: float
    positions: int
    sequences: int
    calibration: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll_nats: float
    tokens: int
    windows: int
    context_tokens: int
    path: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def calibration_from_texts(model, tokenizer, texts: Sequence[str], description: str
                           ) -> Calibration:
    """Tokenize `texts` (special tokens as for prompts, then an end token) for calibration."""
    if not texts:
        raise MoeszError("the calibration set is empty; give at least one text")
    ends = sorted(end_token_ids(model, tokenizer))
    seqs = [encode_prompt(tokenizer, t) + ends[:1] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return Calibration(ids, mask, description)


def builtin_calibration(model, tokenizer, per_task: int = 16, split: str = "profile",
                        seed: int = 0) -> Calibration:
    """Prompt + answer texts of every built-in task, `per_task` each, from `split`."""
    from profiles.tasks import TASKS, generate

    texts = [e.prompt + e.answer for t in TASKS for e in generate(t, split, per_task, seed)]
    return calibration_from_texts(model, tokenizer, texts,
                                  f"built-in tasks, {per_task} {split} examples each")


@torch.no_grad()
def _log_probs(model, calib: Calibration, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for s in range(0, calib.input_ids.shape[0], batch_size):
        ids = calib.input_ids[s:s + batch_size].to(device)
        mask = calib.attention_mask[s:s + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(logits.float().log_softmax(-1)[mask.bool()].cpu())
    return torch.cat(out)


def base_distributions(model, calib: Calibration, batch_size: int = 32) -> BaseDistributions:
    """Run the (unperturbed) model once on the calibration set; reuse the result for a sweep."""
    return BaseDistributions(_log_probs(model, calib, batch_size), calib)


def fidelity(model, base: BaseDistributions, batch_size: int = 32) -> FidelityResult:
    """Mean KL(base || model) in nats and top-1 agreement on the base's calibration set."""
    lp = _log_probs(model, base.calibration, batch_size)
    lb = base.log_probs
    kl = (lb.exp() * (lb - lp)).sum(-1).clamp(min=0.0)  # rounding can give -1e-9
    agree = (lb.argmax(-1) == lp.argmax(-1)).double().mean()
    return FidelityResult(float(kl.double().mean()), float(kl.max()), float(agree),
                          int(lb.shape[0]), int(base.calibration.input_ids.shape[0]),
                          base.calibration.description)


@torch.no_grad()
def perplexity(model, tokenizer, path: str | Path, context_tokens: int = 512,
               batch_size: int = 8) -> PerplexityResult:
    """Perplexity of a local UTF-8 text file, in non-overlapping windows of `context_tokens`.

    Each window starts with the tokenizer's BOS when it has one, so every text token is predicted.

    Raises:
        MoeszError: the file is missing, empty or too short (fewer than 2 tokens).
    """
    path = Path(path)
    if not path.is_file():
        raise MoeszError(f"{path}: no such text file for perplexity; give a local UTF-8 file")
    text = path.read_text(encoding="utf-8")
    if count_tokens(tokenizer, text) < 2:
        raise MoeszError(f"{path}: needs at least 2 tokens of text for perplexity")
    tokens = encode_prompt(tokenizer, text)
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = [bos] if bos is not None and tokens and tokens[0] == bos else []
    body = tokens[len(lead):]
    limit = getattr(model.config, "max_position_embeddings", None) or context_tokens
    span = max(2, min(context_tokens, limit) - len(lead))
    windows = [lead + body[i:i + span] for i in range(0, len(body), span)]
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for s in range(0, len(windows), batch_size):
        chunk = windows[s:s + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, w in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        lp = logits[:, :-1].log_softmax(-1).cpu()
        target, valid = ids[:, 1:], mask[:, 1:].bool()
        picked = lp.gather(-1, target[..., None])[..., 0]
        nll -= float(picked[valid].double().sum())
        count += int(valid.sum())
    if count == 0:
        raise MoeszError(f"{path}: no token could be predicted; the text is too short")
    return PerplexityResult(math.exp(nll / count), nll / count, count, len(windows),
                            span + len(lead), str(path))
