"""Label-free metrics on a text corpus: next-token KL divergence to the unperturbed model, top-1
agreement and perplexity ratio, each with a bootstrap interval over sequences.

A corpus is any UTF-8 file. Blank lines separate documents; each document is tokenized (no
special tokens), cut into sequences of at most `seq_tokens` tokens (BOS first when the tokenizer
has one), and every sequence is assigned to the `profile` or the `validate` half by a stable hash
of its token ids (`split_of`), so profiling and validation never see the same sequence and a rerun
gets the same halves. User benchmarks are split the same way, by the hash of the question.

On a half, the unperturbed model's next-token log-probabilities are computed once
(`text_reference`); a perturbed model is then compared at every position that predicts a real
next token (`text_metrics`):

- KL(base || perturbed) in nats per token: sum_v p_base(v) (log p_base(v) - log p_pert(v)),
  averaged over all positions (a ratio of sums over sequences);
- top-1 agreement: the share of positions where both models' most likely token is the same;
- perplexity ratio: exp(mean NLL of the perturbed model - mean NLL of the base model) on the
  corpus's own next tokens.

Positions of one sequence are correlated, sequences are not (they are disjoint pieces of the
corpus), so the 95 % intervals are percentile bootstraps over sequences (B. Efron and R.
Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13), with a fixed generator seed: the same
weights give the same interval. Memory: the reference holds positions x vocabulary float32 values,
so the default text budget is as many predicted tokens as fit in `REFERENCE_BYTES` (2 GiB), at
most `MAX_AUTO_TOKENS`: 262 144 tokens for the built-in model's 21-token vocabulary, 16 384 for a
32 k vocabulary, 3 579 for a 150 k one (`auto_max_tokens`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from profiles.errors import MoeszError
from profiles.evaluation.accuracy import Interval

SPLIT_METHOD = ("blake2b (8 bytes) of the item's UTF-8 question (benchmarks) or its token ids "
                "(text sequences): last byte even -> profile, odd -> validate")
SPLITS = ("profile", "validate")
BOOTSTRAP = 2000
DEFAULT_SEQ_TOKENS = 128
DEFAULT_MAX_TOKENS = None           # None: as many as REFERENCE_BYTES allow, at most MAX_AUTO
REFERENCE_BYTES = 2 << 30           # the reference's log-probabilities: 2 GiB at most
MAX_AUTO_TOKENS = 262144
Progress = Callable[[int, int, str], None]


def split_of(item: str | Sequence[int]) -> str:
    """`profile` or `validate` for a question (str) or a token sequence, stably."""
    data = item.encode("utf-8") if isinstance(item, str) else \
        np.asarray(list(item), dtype="<i8").tobytes()
    return "profile" if hashlib.blake2b(data, digest_size=8).digest()[-1] % 2 == 0 else "validate"


def check_split(split: str, what: str = "--split") -> str:
    if split not in SPLITS:
        raise MoeszError(f"{what} {split!r} is invalid; choose profile or validate")
    return split


@dataclass(frozen=True)
class TextCorpus:
    """The sequences of one half of a text file.

    Attributes:
        path: the file.
        split: `profile` or `validate`.
        sequences: token ids per sequence (BOS first when the tokenizer has one).
        seq_tokens: the longest sequence, in tokens.
        total_sequences: sequences in the whole file (both halves, before `max_tokens`).
    """

    path: str
    split: str
    sequences: tuple[tuple[int, ...], ...]
    seq_tokens: int
    total_sequences: int

    @property
    def tokens(self) -> int:
        """Predicted positions: every token after the first of each sequence."""
        return sum(len(s) - 1 for s in self.sequences)

    def describe(self) -> str:
        return (f"{self.path}, {self.split} half: {len(self.sequences)} sequences, "
                f"{self.tokens} predicted tokens")


def _encode(tokenizer, text: str) -> list[int]:
    from profiles.tasks.tokenizer import CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        return list(tokenizer.encode(text, add_bos=False))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def auto_max_tokens(model) -> int:
    """The default text budget for `model`: predicted tokens whose reference fits in
    `REFERENCE_BYTES` (float32 per vocabulary entry), at most `MAX_AUTO_TOKENS`."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32000
    # [positions, vocab] float32 -> bytes = 4 * positions * vocab
    return max(256, min(MAX_AUTO_TOKENS, REFERENCE_BYTES // (4 * int(vocab))))


def read_text_file(path) -> str:
    """The text of a `--text` corpus.

    Raises:
        ConfigError: a missing, non-UTF-8 or empty (whitespace only) file.
    """
    from profiles.errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--text {p}: no such file; give a local UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--text {p}: not UTF-8 ({exc.reason} at byte {exc.start}); give a "
                          f"UTF-8 text file") from None
    if not text.strip():
        raise ConfigError(f"--text {p}: the file is empty; give a UTF-8 text with at least a few "
                          f"hundred tokens")
    return text


def read_text(path: str | Path, tokenizer, split: str, seq_tokens: int = DEFAULT_SEQ_TOKENS,
              max_tokens: int | None = DEFAULT_MAX_TOKENS, model=None,
              all_tokens: bool = False) -> TextCorpus:
    """One half of a UTF-8 text file, as token sequences.

    Args:
        path: the file; blank lines separate documents.
        tokenizer: the model's tokenizer (built-in `CharTokenizer` or Hugging Face).
        split: `profile` or `validate`.
        seq_tokens: longest sequence in tokens, BOS included (capped by the model's
            `max_position_embeddings` when `model` is given).
        max_tokens: stop adding sequences once this many predicted tokens are in (None: the
            default budget for `model`, `auto_max_tokens`).
        model: the model, for its context length and vocabulary.
        all_tokens: ignore `max_tokens` and take the whole half.

    Raises:
        MoeszError: a missing, unreadable, non-UTF-8 or empty file, one the tokenizer cannot
            encode, or a half without any sequence of at least 2 tokens.
    """
    check_split(split)
    p = Path(path)
    text = read_text_file(p)
    docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    width = max(2, min(seq_tokens, limit) if limit else seq_tokens)
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = [int(bos)] if bos is not None else []
    span = max(1, width - len(lead))
    seqs: list[tuple[int, ...]] = []
    for d in docs:
        try:
            ids = _encode(tokenizer, d)
        except MoeszError as exc:
            raise MoeszError(f"--text {p}: the model's tokenizer cannot encode it "
                             f"({exc})") from None
        for i in range(0, len(ids), span):
            s = tuple(lead + ids[i:i + span])
            if len(s) >= 2:
                seqs.append(s)
    if max_tokens is None and not all_tokens:
        max_tokens = auto_max_tokens(model)
    mine, total = [], 0
    for s in seqs:
        if split_of(s) == split and (all_tokens or total < max_tokens):
            mine.append(s)
            total += len(s) - 1
    if not mine:
        raise MoeszError(f"--text {p}: its {split} half has no sequence of 2 or more tokens "
                         f"({len(seqs)} sequences in all); give a longer text")
    return TextCorpus(str(p), split, tuple(mine), width, len(seqs))


def corpus_from_texts(tokenizer, texts: Sequence[str], description: str, split: str,
                      model=None) -> TextCorpus:
    """A corpus of given texts, one sequence each (BOS first when the tokenizer has one), e.g. the
    built-in tasks' prompts and answers of one split (already disjoint, so not hashed)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = [int(bos)] if bos is not None else []
    seqs = []
    for t in texts:
        s = tuple(lead + _encode(tokenizer, t))
        s = s[:limit] if limit else s
        if len(s) >= 2:
            seqs.append(s)
    if not seqs:
        raise MoeszError(f"{description}: no text of 2 or more tokens")
    return TextCorpus(description, split, tuple(seqs), max(len(s) for s in seqs), len(seqs))


def builtin_corpus(tokenizer, split: str, per_task: int = 16, seed: int = 0,
                   model=None) -> TextCorpus:
    """Prompt + answer texts of every built-in task, `per_task` each, from `split`."""
    from profiles.tasks import TASKS, generate

    texts = [e.prompt + e.answer for t in TASKS for e in generate(t, split, per_task, seed)]
    return corpus_from_texts(tokenizer, texts, f"built-in tasks, {per_task} {split} examples "
                             f"each", split, model)


@dataclass(frozen=True)
class TextReference:
    """The unperturbed model's next-token log-probabilities on a corpus half."""

    corpus: TextCorpus
    log_probs: tuple[torch.Tensor, ...]   # per sequence [len - 1, vocab] float32
    targets: tuple[torch.Tensor, ...]     # per sequence [len - 1] int64: the next tokens
    nll: np.ndarray                       # per sequence: summed NLL of the base model, nats


@torch.no_grad()
def _log_probs(model, corpus: TextCorpus, batch_size: int,
               progress: Progress | None = None, label: str = "text") -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    seqs = corpus.sequences
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(chunk):
            ids[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        lp = logits.float().log_softmax(-1).cpu()
        out += [lp[r, :len(c) - 1] for r, c in enumerate(chunk)]
        if progress is not None:
            progress(len(out), len(seqs), label)
    return out


def text_reference(model, corpus: TextCorpus, batch_size: int = 64,
                   progress: Progress | None = None) -> TextReference:
    """Run the unperturbed model once on the corpus half; reuse the result for every comparison."""
    lps = _log_probs(model, corpus, batch_size, progress, "text reference")
    targets = tuple(torch.tensor(s[1:], dtype=torch.long) for s in corpus.sequences)
    nll = np.array([-float(lp.gather(-1, t[:, None]).double().sum())
                    for lp, t in zip(lps, targets)])
    return TextReference(corpus, tuple(lps), targets, nll)


@dataclass(frozen=True)
class TextMetrics:
    """A perturbed model against the reference, with 95 % bootstrap intervals over sequences."""

    kl_nats: Interval
    top1_agreement: Interval
    ppl_ratio: Interval
    tokens: int
    sequences: int
    corpus: str

    def to_dict(self) -> dict:
        return {"kl_nats": self.kl_nats.to_dict(), "top1_agreement": self.top1_agreement.to_dict(),
                "ppl_ratio": self.ppl_ratio.to_dict(), "tokens": self.tokens,
                "sequences": self.sequences, "corpus": self.corpus}

    @classmethod
    def from_dict(cls, d: dict) -> "TextMetrics":
        return cls(Interval.from_dict(d["kl_nats"]), Interval.from_dict(d["top1_agreement"]),
                   Interval.from_dict(d["ppl_ratio"]), int(d["tokens"]), int(d["sequences"]),
                   str(d["corpus"]))


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, transform=None, seed: int = 0,
                    resamples: int = BOOTSTRAP) -> tuple[float, float, float]:
    """(point, low, high): sum(num) / sum(den) with its 95 % percentile bootstrap over the items
    (resampled with replacement); `transform` maps the ratio (e.g. exp)."""
    f = transform or (lambda x: x)
    point = f(float(num.sum() / den.sum()))
    if len(num) < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(resamples, len(num)))
    stats = f(num[idx].sum(1) / den[idx].sum(1))
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return point, float(min(lo, point)), float(max(hi, point))


@torch.no_grad()
def per_sequence(model, ref: TextReference, batch_size: int = 64,
                 progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Per sequence of the reference's corpus: summed KL(base || model) `kl` (nats), positions
    where the top-1 tokens agree `agree`, summed NLL of the model `nll` and of the base
    `base_nll`, and predicted positions `n` (what `text_metrics` and additivity checks pool)."""
    lps = _log_probs(model, ref.corpus, batch_size, progress, "text metrics")
    kl, agree, nll, n = [], [], [], []
    for lb, lp, t in zip(ref.log_probs, lps, ref.targets):
        k = (lb.exp() * (lb - lp)).sum(-1).clamp(min=0.0)  # rounding can give -1e-9
        kl.append(float(k.double().sum()))
        agree.append(float((lb.argmax(-1) == lp.argmax(-1)).double().sum()))
        nll.append(-float(lp.gather(-1, t[:, None]).double().sum()))
        n.append(float(len(t)))
    return {"kl": np.asarray(kl), "agree": np.asarray(agree), "nll": np.asarray(nll),
            "base_nll": ref.nll, "n": np.asarray(n)}


def text_metrics(model, ref: TextReference, batch_size: int = 64,
                 progress: Progress | None = None) -> TextMetrics:
    """KL(base || model), top-1 agreement and perplexity ratio on the reference's corpus half."""
    d = per_sequence(model, ref, batch_size, progress)
    kl, agree, nll, n = d["kl"], d["agree"], d["nll"], d["n"]
    method = f"percentile bootstrap over {len(n)} sequences, {BOOTSTRAP} resamples (95%)"
    k = bootstrap_ratio(kl, n)
    a = bootstrap_ratio(agree, n)
    r = bootstrap_ratio(nll - ref.nll, n, transform=np.exp)
    return TextMetrics(Interval(*k, method), Interval(*a, method), Interval(*r, method),
                       int(n.sum()), len(n), ref.corpus.describe())


def builtin_corpus_path() -> Path:
    """The text corpus shipped with the package: prompts and answers of the built-in tasks, one
    example per document (see `profiles/builtin/corpus.txt`)."""
    return Path(__file__).resolve().parents[1] / "builtin" / "corpus.txt"


def kl_half_width_ratio(m: TextMetrics) -> float:
    """Half-width of the KL interval over its point estimate (inf for a zero estimate)."""
    v = m.kl_nats.value
    return math.inf if v <= 0 else (m.kl_nats.high - m.kl_nats.low) / 2 / v
