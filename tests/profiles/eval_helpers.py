"""Tiny checkpoints with a real Hugging Face tokenizer, for evaluation, trace and CLI tests.

The tokenizer is character-level over the built-in tasks' alphabet (ids 0, 1, 2 are padding, BOS
and EOS, as in `profiles.tasks.CharTokenizer`), built with the `tokenizers` library and wrapped in
`PreTrainedTokenizerFast`, so the Hugging Face code path of generation is exercised without any
download.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures_models import save_tiny_model

CHARS = "0123456789+-=[]SR "


def hf_char_tokenizer():
    """A `PreTrainedTokenizerFast` that maps each character to one id and prepends BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


TEXT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz .,?:#+-=[]SR\n"


def hf_text_tokenizer():
    """A character-level `PreTrainedTokenizerFast` over digits, lower-case letters and the
    punctuation of questions and prose (unknown characters map to <unk>), prepending BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(TEXT_CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def save_text_checkpoint(arch: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny random `arch` checkpoint with the text tokenizer beside it: a user's model that
    reads prose and questions, not the built-in tasks' format."""
    path = save_tiny_model(arch, path, seed=seed, **overrides)
    hf_text_tokenizer().save_pretrained(path)
    return path


def save_tiny_checkpoint(arch: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny random `arch` checkpoint (bf16 safetensors) with the character tokenizer beside it."""
    path = save_tiny_model(arch, path, seed=seed, **overrides)
    hf_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test on one intra-op thread: the machine's 2 cores are shared, and torch's
    spinning worker threads make tiny models 20x slower when oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
