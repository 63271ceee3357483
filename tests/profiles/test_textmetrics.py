"""Text metrics (KL, top-1 agreement, perplexity ratio with bootstrap intervals), the stable
profile/validate split, and the benchmark halves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from profiles.errors import MoeszError
from profiles.evaluation.textmetrics import (bootstrap_ratio, builtin_corpus, builtin_corpus_path,
                                             read_text, split_of, text_metrics, text_reference)
from profiles.evaluation.userbench import UserBenchmark
from tests.profiles.eval_helpers import hf_text_tokenizer, one_torch_thread  # noqa: F401
from tests.fixtures_models import tiny_model


def _corpus(path, paragraphs: int = 40):
    words = "the cat sat on a mat and then it ran to see what was there by the sea".split()
    rng = np.random.default_rng(0)
    text = "\n\n".join(" ".join(rng.choice(words, size=int(rng.integers(10, 40))))
                       for _ in range(paragraphs))
    path.write_text(text, encoding="utf-8")
    return path


def test_split_is_stable_disjoint_and_balanced():
    qs = [f"question {i}?" for i in range(2000)]
    halves = [split_of(q) for q in qs]
    assert halves == [split_of(q) for q in qs]           # stable
    share = halves.count("profile") / len(halves)
    assert 0.45 < share < 0.55
    assert split_of((1, 2, 3)) == split_of([1, 2, 3])    # token ids: by value, any sequence type


def test_text_halves_partition_the_file(tmp_path):
    tok = hf_text_tokenizer()
    path = _corpus(tmp_path / "c.txt")
    prof = read_text(path, tok, "profile", seq_tokens=32, all_tokens=True)
    val = read_text(path, tok, "validate", seq_tokens=32, all_tokens=True)
    assert not set(prof.sequences) & set(val.sequences)
    assert len(prof.sequences) + len(val.sequences) == prof.total_sequences
    assert all(s[0] == tok.bos_token_id and len(s) <= 32 for s in prof.sequences)
    capped = read_text(path, tok, "profile", seq_tokens=32, max_tokens=100)
    assert 100 <= capped.tokens < 100 + 32 and capped.sequences == prof.sequences[:len(
        capped.sequences)]


def test_unperturbed_model_has_zero_kl_and_unit_ratio(tmp_path):
    model = tiny_model("mixtral").eval()
    corpus = read_text(_corpus(tmp_path / "c.txt"), hf_text_tokenizer(), "profile", 32, 2000)
    ref = text_reference(model, corpus)
    m = text_metrics(model, ref)
    assert m.kl_nats.value == pytest.approx(0.0, abs=1e-7)
    assert m.top1_agreement.value == 1.0
    assert m.ppl_ratio.value == pytest.approx(1.0, abs=1e-6)
    assert m.tokens == corpus.tokens and m.sequences == len(corpus.sequences)


def test_kl_grows_with_the_perturbation_and_its_interval_brackets_it(tmp_path):
    model = tiny_model("mixtral").eval()
    corpus = read_text(_corpus(tmp_path / "c.txt"), hf_text_tokenizer(), "profile", 32, 2000)
    ref = text_reference(model, corpus)
    w = model.model.layers[1].mlp.experts.down_proj
    original = w.detach().clone()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(w.shape, generator=gen)
    kls = []
    for scale in (0.5, 2.0):
        with torch.no_grad():
            w.copy_(original + scale * original.abs().mean() * noise)
        m = text_metrics(model, ref)
        assert m.kl_nats.low <= m.kl_nats.value <= m.kl_nats.high
        assert m.ppl_ratio.low <= m.ppl_ratio.value <= m.ppl_ratio.high
        kls.append(m.kl_nats.value)
    assert 0 < kls[0] < kls[1]


def test_bootstrap_ratio_golden():
    # every item has the same ratio: every resample has it too
    v, lo, hi = bootstrap_ratio(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]))
    assert (v, lo, hi) == (0.5, 0.5, 0.5)
    v, lo, hi = bootstrap_ratio(np.array([0.0, 1.0] * 50), np.ones(100))
    assert v == 0.5 and 0.39 < lo < 0.45 and 0.55 < hi < 0.61   # ~ +-1.96 * 0.05


def test_benchmark_halves_are_disjoint(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps({"question": f"what is {i} plus 1?",
                                        "answer": f"#### {i + 1}"}) + "\n" for i in range(60)))
    prof = UserBenchmark(str(path), split="profile").examples()
    val = UserBenchmark(str(path), split="validate").examples()
    assert {e.prompt for e in prof}.isdisjoint({e.prompt for e in val})
    assert len(prof) + len(val) == 60 and prof and val


def test_bad_text_and_pattern_lines(tmp_path):
    tok = hf_text_tokenizer()
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(MoeszError, match="empty"):
        read_text(tmp_path / "empty.txt", tok, "profile")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MoeszError, match="not UTF-8"):
        read_text(tmp_path / "bin.txt", tok, "profile")
    with pytest.raises(MoeszError, match="no such file"):
        read_text(tmp_path / "nope.txt", tok, "profile")
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "42"}) + "\n")
    with pytest.raises(MoeszError, match="finds the reference in none"):
        UserBenchmark(str(path), extract=r"ANSWER: (\d+)").check_extract()
    UserBenchmark(str(path), extract=r"(\d+)").check_extract()


def test_builtin_corpus_ships_and_encodes():
    from profiles.tasks.tokenizer import CharTokenizer

    tok = CharTokenizer()
    path = builtin_corpus_path()
    assert path.is_file()
    prof = read_text(path, tok, "profile", seq_tokens=64)
    assert prof.tokens > 4000
    assert builtin_corpus(tok, "validate", per_task=2).sequences
