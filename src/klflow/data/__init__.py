"""Corpora, tokenizers, token shards with document boundaries, and batch layouts."""

from klflow.data.batches import Batch, RandomWindows, validation_windows
from klflow.data.corpus import Example, Source, SourceOptions
from klflow.data.fetch import klflow_home
from klflow.data.layouts import LAYOUTS, BatchStream, make_batches, validation_batches
from klflow.data.registry import CORPORA, humaneval_tasks
from klflow.data.shards import FORMAT_VERSION, PreparedData, check_compatible, default_data_dir, prepare
from klflow.data.sources import Corpus, load_corpus, open_source
from klflow.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_KINDS, TextTokenizer

__all__ = [
    "CORPORA",
    "FORMAT_VERSION",
    "LAYOUTS",
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "Batch",
    "BatchStream",
    "Corpus",
    "Example",
    "PreparedData",
    "RandomWindows",
    "Source",
    "SourceOptions",
    "TextTokenizer",
    "check_compatible",
    "default_data_dir",
    "humaneval_tasks",
    "klflow_home",
    "load_corpus",
    "make_batches",
    "open_source",
    "prepare",
    "validation_batches",
    "validation_windows",
]
