"""The built-in model: a small trained `qwen3_moe` model shipped inside the package.

`load_builtin()` returns the model (eval mode, bf16 weights as shipped and bf16 compute by default)
and its character tokenizer. The weights are produced by `python -m profiles.builtin.train` (see
that module); `MOESZ_BUILTIN_DIR` points at another directory with the same three files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from profiles.errors import ModelError

BUILTIN_DIR = Path(__file__).resolve().parent
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def builtin_dir() -> Path:
    """The directory holding the built-in model's files."""
    return Path(os.environ.get("MOESZ_BUILTIN_DIR", BUILTIN_DIR))


def load_builtin(dtype: torch.dtype = torch.bfloat16):
    """Load the built-in model and tokenizer.

    Args:
        dtype: dtype of the returned model's weights. The shipped weights are bf16; the default
            keeps them bf16 so that codec round trips act on the checkpoint's real bytes.

    Returns:
        (model, tokenizer): a `Qwen3MoeForCausalLM` in eval mode and a `CharTokenizer`.

    Raises:
        ModelError: the weights are missing (train them with `python -m profiles.builtin.train`).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # moesz reports its own progress

    from profiles.tasks import CharTokenizer

    d = builtin_dir()
    missing = [f for f in FILES if not (d / f).exists()]
    if missing:
        raise ModelError(f"built-in model files {', '.join(missing)} are missing in {d}; "
                         f"train them with `python -m profiles.builtin.train --out {d}`")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    model.eval()
    return model, CharTokenizer.load(d / "tokenizer.json")
