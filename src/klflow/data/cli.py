"""`klflow prepare`: arguments and command."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from klflow.data.corpus import SourceOptions
from klflow.data.hf import HF_PREFIX
from klflow.data.registry import CHITCHAT, CORPORA
from klflow.data.shards import prepare
from klflow.data.tokenizer import TOKENIZER_KINDS
from klflow.errors import KLFlowError

_DEFAULT_VOCAB_SIZE = 4096


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `klflow prepare`; the command is `cmd_prepare`."""
    parser.add_argument("source", nargs="?", default=None, metavar="NAME_OR_PATH",
                        help=f"a named corpus (see --list; default {CHITCHAT}) or a local text file, folder, .jsonl or "
                             ".parquet (write ./NAME for a path named like a corpus)")
    parser.add_argument("--list", action="store_true", help="list the named corpora with license, size and origin")
    parser.add_argument("--tokenizer", default="bpe", metavar="KIND_OR_PATH",
                        help=f"{' | '.join(TOKENIZER_KINDS)} (default bpe), or a tokenizer.json or a checkpoint or "
                             "prepared folder holding one, to reuse its tokenizer")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"bpe: vocabulary size, special tokens included (default {_DEFAULT_VOCAB_SIZE}); "
                             "char: the most tokens to use; not for gpt2")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the klflow cache)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split")
    parser.add_argument("--text-field", default="text", help='JSONL/Parquet/HF field holding the text (default "text"; '
                                                             'a dotted path reaches into nested records)')
    parser.add_argument("--prompt-field", default=None, help="field holding the prompt of prompt -> response pairs")
    parser.add_argument("--response-field", default=None, help="field holding the response of prompt -> response pairs")
    parser.add_argument("--hf", default=None, metavar="DATASET",
                        help="a Hugging Face dataset (needs `datasets`; read from its cache, or the hub when reachable)")
    parser.add_argument("--hf-config", default=None, help="the Hugging Face dataset's configuration, e.g. de-en")
    parser.add_argument("--hf-split", default="train", help="the Hugging Face dataset's split (default train)")
    parser.add_argument("--streaming", action="store_true",
                        help="never hold the corpus in memory (hash-based split; --hf datasets are streamed)")
    parser.add_argument("--force", action="store_true", help="tokenize again even when the cache holds this corpus")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.list:
        print(corpus_table())
        return 0
    if args.hf is not None and args.source is not None:
        raise KLFlowError("give either a corpus name or path, or --hf DATASET, not both")
    if args.tokenizer == "gpt2" and args.vocab_size is not None:
        raise KLFlowError("--vocab-size does not apply to the gpt2 tokenizer (its vocabulary is fixed, V=50259)")
    source = HF_PREFIX + args.hf if args.hf is not None else args.source or CHITCHAT
    options = SourceOptions(args.text_field, args.prompt_field, args.response_field, args.hf_config, args.hf_split)
    started = time.perf_counter()
    data = prepare(source, args.out, args.vocab_size or _DEFAULT_VOCAB_SIZE, args.val_fraction, args.seed,
                   progress=not args.no_progress, tokenizer=args.tokenizer, options=options, streaming=args.streaming,
                   force=args.force)
    m = data.meta
    seconds = time.perf_counter() - started
    kind = "documents (prompt -> response pairs)" if m["pairs"] else "documents"
    speed = "reused the cache" if data.reused else f"{m['n_bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s"
    print(f"{m['source']}: {m['n_documents']} {kind} ({m['n_train_documents']} train / {m['n_val_documents']} val), "
          f"{m['n_train_tokens']:,} train + {m['n_val_tokens']:,} val tokens, {m['bytes_per_token']:.2f} bytes/token, "
          f"{m['n_bytes'] / 1e6:.1f} MB, V={m['vocab_size']} ({m['tokenizer']}) -> {data.dir} ({seconds:.1f}s, {speed})")
    return 0


def corpus_table() -> str:
    """The named corpora, one block each: name, description, license, size, origin."""
    blocks = [f"{c.name}\n  {c.description}\n  license: {c.license}; size: {c.size}\n  from: {c.fetched}"
              for c in CORPORA.values()]
    return "\n".join(blocks) + "\n\nAny other corpus: a local path, or --hf DATASET (see klflow prepare --help)."
