"""Byte-level BPE tokenizer with klflow's fixed special tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from klflow.errors import KLFlowError

# End-of-text, padding and mask; always ids 0, 1, 2 so models and samplers can rely on them.
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|mask|>")
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # specials plus every byte


def check_vocab_size(vocab_size: int) -> None:
    """Reject a vocabulary too small to hold the special tokens and all 256 bytes."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise KLFlowError(f"vocab size {vocab_size} is too small; it must be at least {MIN_VOCAB_SIZE}")


class TextTokenizer:
    """A trained `tokenizers.Tokenizer` whose ids 0, 1, 2 are `SPECIAL_TOKENS`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise KLFlowError(f"tokenizer does not have {token} at id {expected_id}")
        # Text that merely spells a special token must stay text, or a document could forge an end-of-text.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> TextTokenizer:
        """Train a byte-level BPE of exactly `vocab_size` tokens (special tokens included)."""
        check_vocab_size(vocab_size)
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(documents, trainer)
        learned = tokenizer.get_vocab_size()
        if learned < vocab_size:
            raise KLFlowError(
                f"vocab size {vocab_size} is larger than this corpus supports ({learned} tokens learned)"
            )
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load a tokenizer saved by `save`."""
        path = Path(path)
        if not path.is_file():
            raise KLFlowError(f"tokenizer file not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception:  # the Rust side raises a bare Exception for any parse error
            raise KLFlowError(f"{path} is not a tokenizer JSON file") from None
        return cls(tokenizer)

    def save(self, path: str | Path) -> None:
        self._tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (the library's Rust thread pool)."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch_fast(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, without pad/mask tokens and with each end-of-text shown as a newline."""
        segments: list[list[int]] = [[]]
        for token in ids:
            token = int(token)
            if token == self.eot_id:
                segments.append([])
            elif token not in (self.pad_id, self.mask_id):
                segments[-1].append(token)
        return "\n".join(self._tokenizer.decode_batch(segments))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return 0

    @property
    def pad_id(self) -> int:
        return 1

    @property
    def mask_id(self) -> int:
        return 2

    @property
    def fingerprint(self) -> str:
        """Short hash of the full tokenizer definition, to detect a mismatched tokenizer."""
        return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()[:16]
