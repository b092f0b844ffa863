"""Corpus loading, tokenization, token shards and batches."""

from klflow.data.batches import Batch, RandomWindows, validation_windows
from klflow.data.corpus import Corpus, load_corpus
from klflow.data.shards import PreparedData, default_data_dir, klflow_home, prepare
from klflow.data.tokenizer import SPECIAL_TOKENS, TextTokenizer

__all__ = [
    "Batch",
    "Corpus",
    "PreparedData",
    "RandomWindows",
    "SPECIAL_TOKENS",
    "TextTokenizer",
    "default_data_dir",
    "klflow_home",
    "load_corpus",
    "prepare",
    "validation_windows",
]
