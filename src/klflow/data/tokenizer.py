"""Tokenizers (byte-level BPE trained on the corpus, GPT-2, character-level) with klflow's special tokens."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from klflow.errors import KLFlowError

# End-of-text, padding and mask. Their ids are looked up: 0, 1, 2 in a trained BPE, 50256-50258 in GPT-2.
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|mask|>")
TOKENIZER_KINDS = ("bpe", "gpt2", "char")
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # specials plus every byte


def check_vocab_size(vocab_size: int) -> None:
    """Reject a vocabulary too small to hold the special tokens and all 256 bytes."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise KLFlowError(f"vocab size {vocab_size} is too small; it must be at least {MIN_VOCAB_SIZE} (--vocab-size, the data.vocab_size key)")


class TextTokenizer:
    """A `tokenizers.Tokenizer` that has all of `SPECIAL_TOKENS`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
        found = [i for i in ids.values() if i is not None]
        if len(found) < len(SPECIAL_TOKENS):
            raise KLFlowError(f"tokenizer has no {', '.join(t for t, i in ids.items() if i is None)} token")
        # Text that merely spells a special token must stay text, or a document could forge an end-of-text.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self._eot_id, self._pad_id, self._mask_id = found

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> TextTokenizer:
        """Train a byte-level BPE of exactly `vocab_size` tokens; the special tokens get ids 0, 1, 2."""
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
                f"vocab size {vocab_size} is larger than this corpus supports ({learned} tokens learned); "
                f"give --vocab-size {learned} or less (the data.vocab_size key)"
            )
        return cls(tokenizer)

    @classmethod
    def train_chars(cls, documents: Iterable[str], max_vocab_size: int) -> TextTokenizer:
        """One token per character: the corpus's most frequent characters, as many as fit in
        `max_vocab_size` beside the specials and 256 byte tokens that spell every other character."""
        check_vocab_size(max_vocab_size)
        counts: Counter[str] = Counter()
        for document in documents:
            counts.update(document)
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        vocab.update({f"<0x{byte:02X}>": len(SPECIAL_TOKENS) + byte for byte in range(256)})
        for char, _ in counts.most_common():
            if len(vocab) == max_vocab_size:
                break
            vocab.setdefault(char, len(vocab))
        # No pre-tokenizer and no merges: every character is looked up on its own.
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(tokenizer)

    @classmethod
    def gpt2(cls, files: Path) -> TextTokenizer:
        """GPT-2's BPE from its encoder.json and vocab.bpe in `files` (ids as in GPT-2; end-of-text is
        50256), with pad 50257 and mask 50258 added after it."""
        try:
            model = models.BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe"))
        except Exception:  # the Rust side raises a bare Exception for any parse error
            raise KLFlowError(f"{files} does not hold GPT-2's encoder.json and vocab.bpe") from None
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # <|endoftext|> keeps its id 50256
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
            if token == self._eot_id:
                segments.append([])
            elif token not in (self._pad_id, self._mask_id):
                segments[-1].append(token)
        return "\n".join(self._tokenizer.decode_batch(segments))

    def token_texts(self) -> list[str]:
        """The text of each id on its own ("" for the special tokens); partial characters show as U+FFFD."""
        return self._tokenizer.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def fingerprint(self) -> str:
        """Short hash of the full tokenizer definition, to detect a mismatched tokenizer."""
        return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def tokenizer_file(spec: str) -> Path | None:
    """The tokenizer.json that `spec` points at (the file, or a prepared-data or checkpoint folder
    holding one); None when `spec` is one of TOKENIZER_KINDS."""
    if spec in TOKENIZER_KINDS:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise KLFlowError(f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)} or a tokenizer.json "
                          f"(or a folder holding one); {spec} is neither")
    return path
