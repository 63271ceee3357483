"""A character-level tokenizer for the built-in model and its tasks.

It offers the slice of the Hugging Face tokenizer interface that moesz uses (`encode`, `decode`,
`batch_encode` with left padding, `pad_token_id`, `eos_token_id`, `bos_token_id`), so evaluation code
treats the built-in model and real checkpoints alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from profiles.errors import ModelError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
# Every character any built-in task prompt or answer can contain.
DEFAULT_CHARS = "0123456789+-=[]SR "


class CharTokenizer:
    """Maps single characters to ids; ids 0, 1, 2 are padding, begin and end of sequence."""

    def __init__(self, chars: str = DEFAULT_CHARS):
        self.vocab: list[str] = [PAD, BOS, EOS, *chars]
        self._index = {c: i for i, c in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Return token ids for `text`, prefixed by BOS when `add_bos`.

        Raises:
            ModelError: `text` holds a character outside the vocabulary.
        """
        try:
            ids = [self._index[c] for c in text]
        except KeyError as exc:
            raise ModelError(f"character {exc.args[0]!r} is not in the built-in tokenizer's "
                             f"vocabulary {''.join(self.vocab[3:])!r}") from None
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Turn ids back into text; stops at the first EOS when skipping special tokens. An id
        past the vocabulary (a model with a larger embedding, e.g. random weights of a real
        geometry) becomes U+FFFD, so such an answer is simply wrong."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if skip_special_tokens:
                if i == self.eos_token_id:
                    break
                if i < 3:
                    continue
            out.append(self.vocab[i] if 0 <= i < len(self.vocab) else "\ufffd")
        return "".join(out)

    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad a batch of prompts; returns (input_ids, attention_mask), both [batch, seq] int64."""
        seqs = [self.encode(t) for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
        return ids, mask

    def save(self, path: str | Path) -> None:
        from profiles.fileio import atomic_write_json

        atomic_write_json(path, {"kind": "char_tokenizer", "vocab": self.vocab})

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        doc = json.loads(Path(path).read_text())
        if doc.get("kind") != "char_tokenizer" or doc["vocab"][:3] != [PAD, BOS, EOS]:
            raise ModelError(f"{path}: not a moesz character tokenizer file")
        return cls("".join(doc["vocab"][3:]))
